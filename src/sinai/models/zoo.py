"""Models by name, each returned as an :class:`ImageClassifier` on [0, 1] images, in eval mode.

Names come from a decorator registry, as timm's ``register_model``: ``mnist-cnn`` / ``mnist-vit`` /
``mnist-cnn-at[:eps=E,steps=S,alpha=A]`` / ``mnist-cnn-surrogate`` (the embedded models sinai trains and
caches, registered in :mod:`sinai.models.embedded`) and the families
``timm:<timm name>`` and ``torchvision:<torchvision classifier name>`` (registered here). Weights come
from a checkpoint file, from the local Hugging Face / torch hub caches ("pretrained"), or are random
("random", for tests and benchmarks). Nothing here downloads: missing weights are an error that says
where to put which file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from sinai.device import resolve_device
from sinai.models.classifier import ImageClassifier

WEIGHTS = ("pretrained", "random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Prefixes wrapped around a state_dict by DataParallel/DDP, ImageClassifier and torch.compile.
_STRIP_PREFIXES = ("module.", "net.", "_orig_mod.")


Loader = Callable[..., ImageClassifier]
"""``loader(arch, *, checkpoint, weights, num_classes, device, cache_dir, progress) -> ImageClassifier``:
``arch`` is the name (a model) or the part after ``family:`` (a family)."""


@dataclass(frozen=True)
class RegisteredModel:
    """A registry entry: a model (``mnist-cnn``), with ``options`` a model whose name may carry options
    (``mnist-cnn-at:eps=0.2``), or, with ``family``, names written ``<name>:<arch>``."""

    name: str
    load: Loader
    dataset: Callable[[int | None], str]
    family: bool = False
    usage: str = ""
    options: bool = False

    @property
    def accepted(self) -> str:
        """How the name is written, for error messages."""
        if self.usage:
            return self.usage
        if self.family:
            return f"{self.name}:<name>"
        return f"{self.name}[:<options>]" if self.options else self.name


_MODELS: dict[str, RegisteredModel] = {}


def register_model(
    name: str,
    *,
    dataset: str | Callable[[int | None], str],
    family: bool = False,
    usage: str = "",
    options: bool = False,
) -> Callable[[Loader], Loader]:
    """Register the decorated loader under ``name`` (with ``family=True``: every ``name:<arch>``).

    ``dataset`` is the dataset the model is evaluated on by default, or a function of its number of
    classes that says it; ``usage`` is how the name is written in error messages (default: the name).
    With ``options=True`` the name may also be written ``name:<options>`` (the loader gets the whole
    name and parses the options, e.g. ``mnist-cnn-at:eps=0.2``).
    The loader is called as ``loader(arch, *, checkpoint, weights, num_classes, device, cache_dir,
    progress)`` and returns the model (``load_model`` moves it to the device and sets eval mode).
    """
    if ":" in name or not name:
        raise ValueError(f"a model name is a non-empty word without ':', got {name!r}")
    if family and options:
        raise ValueError(f"model {name!r}: a family takes <name>, not options; pass family or options")
    pick = dataset if callable(dataset) else (lambda num_classes, fixed=dataset: fixed)

    def decorator(loader: Loader) -> Loader:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = RegisteredModel(name, loader, pick, family, usage, options)
        return loader

    return decorator


def _registry() -> dict[str, RegisteredModel]:
    import sinai.models.embedded  # noqa: F401 - registers the embedded models

    return _MODELS


def list_models() -> tuple[str, ...]:
    """The registered names: models by name first, then families as ``family:<name>``."""
    entries = sorted(_registry().values(), key=lambda e: e.family)
    return tuple(f"{e.name}:<name>" if e.family else e.name for e in entries)


def load_model(
    name: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    weights: str = "pretrained",
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> ImageClassifier:
    """Build the model called ``name`` as an :class:`ImageClassifier` in eval mode on ``device``.

    ``checkpoint`` (a state_dict file) takes precedence over ``weights``; ``weights="pretrained"`` reads
    the local Hugging Face cache (timm) or torch hub cache (torchvision) only. ``num_classes`` sizes the
    head of timm/torchvision models (default: the model's own, 1000 for ImageNet models).
    ``cache_dir``/``progress`` apply to the embedded models.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    dev = resolve_device(device)
    entry, arch = _lookup(name)
    model = entry.load(
        arch,
        checkpoint=checkpoint,
        weights=weights,
        num_classes=num_classes,
        device=dev,
        cache_dir=cache_dir,
        progress=progress,
    )
    return model.to(dev).eval()


def default_dataset(model_name: str, *, num_classes: int | None = None) -> str:
    """The dataset a model is evaluated on by default: mnist, cifar10 (10-class models) or imagenet."""
    entry, _ = _lookup(model_name)
    return entry.dataset(num_classes)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``path``: raw, or under a "state_dict"/"model" key; wrapper prefixes removed.

    ``.safetensors`` files are read with safetensors, anything else with ``torch.load(weights_only=True)``
    (a checkpoint never runs code).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many types for a bad file
        raise ValueError(
            f"cannot read checkpoint {path}: {err}. Save weights with torch.save(model.state_dict(), FILE)"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"checkpoint {path} holds no state_dict (a dict of tensors, raw or under 'state_dict'/'model'); "
            "save weights with torch.save(model.state_dict(), FILE)"
        )
    state = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


# ------------------------------------------------------------------------------------------- internals


def _lookup(name: str) -> tuple[RegisteredModel, str]:
    registry = _registry()
    entry = registry.get(name)
    if entry is not None and not entry.family:
        return entry, name
    prefix, sep, arch = name.partition(":")
    entry = registry.get(prefix)
    if sep and arch and entry is not None and entry.family:
        return entry, arch
    if sep and arch and entry is not None and entry.options:
        return entry, name
    accepted = [e.accepted for e in sorted(registry.values(), key=lambda e: e.family)]
    listed = f"{', '.join(accepted[:-1])} or {accepted[-1]}" if len(accepted) > 1 else "".join(accepted)
    raise ValueError(f"unknown model {name!r}; accepted names: {listed}")


def _by_classes(num_classes: int | None) -> str:
    return "cifar10" if num_classes == 10 else "imagenet"


def _hub_model(
    name: str,
    checkpoint: str | os.PathLike | None,
    build: Callable[[Mapping[str, torch.Tensor] | None], tuple],
) -> ImageClassifier:
    """A timm / torchvision network from ``build(state)``, with the checkpoint's weights, wrapped."""
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    net, input_shape, mean, std, classes = build(state)
    if state is not None:
        _apply_state_dict(net, state, source=str(checkpoint), name=name)
    return ImageClassifier(net, input_shape=input_shape, num_classes=classes, mean=mean, std=std, name=name)


@register_model(
    "timm",
    family=True,
    dataset=_by_classes,
    usage="timm:<timm model name> (e.g. timm:vit_base_patch16_224, timm:resnet50)",
)
def _load_timm(arch: str, *, checkpoint, weights, num_classes, **_: object) -> ImageClassifier:
    return _hub_model(
        f"timm:{arch}",
        checkpoint,
        lambda state: _build_timm(arch, state=state, weights=weights, num_classes=num_classes),
    )


@register_model(
    "torchvision",
    family=True,
    dataset=_by_classes,
    usage="torchvision:<classifier name> (e.g. torchvision:resnet50)",
)
def _load_torchvision(
    arch: str, *, checkpoint, weights, num_classes, progress, **_: object
) -> ImageClassifier:
    return _hub_model(
        f"torchvision:{arch}",
        checkpoint,
        lambda state: _build_torchvision(
            arch, state=state, weights=weights, num_classes=num_classes, progress=progress
        ),
    )


def _apply_state_dict(net: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, name: str) -> None:
    """Load ``state`` strictly, raising ``ValueError`` that names missing, unexpected or mis-shaped keys."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) e.g. {unexpected[:5]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) e.g. {shapes[:3]}")
        raise ValueError(
            f"checkpoint {source} does not fit {name}: {'; '.join(parts)}. Check the model name, and pass "
            "num_classes (--num-classes) if the checkpoint's head has a different number of classes"
        )
    net.load_state_dict(state, strict=True)


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Hugging Face Hub offline mode for the duration: the env var and the constant read at import."""
    from huggingface_hub import constants

    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_const = constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _torch_hub_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _build_timm(
    arch: str, *, state: Mapping[str, torch.Tensor] | None, weights: str, num_classes: int | None
) -> tuple[nn.Module, tuple[int, ...], tuple[float, ...], tuple[float, ...], int]:
    import timm
    from huggingface_hub import constants

    from_hub = arch.startswith(("hf-hub:", "hf_hub:"))
    if not from_hub and not timm.is_model(arch):
        pattern = arch.split(".")[0].split("_")[0]
        raise ValueError(
            f"unknown timm model {arch!r}; use a name from timm.list_models() "
            f"(e.g. timm.list_models('*{pattern}*')), written as timm:<name>"
        )
    kwargs = {} if num_classes is None else {"num_classes": int(num_classes)}
    pretrained = state is None and weights == "pretrained"
    hf_id = arch.split(":", 1)[1] if from_hub else None
    if pretrained and not from_hub:
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
            raise ValueError(
                f"timm has no pretrained weights for {arch!r}; "
                "pass checkpoint=FILE (--checkpoint) or weights='random'"
            )
        if num_classes is not None and cfg.num_classes and num_classes != cfg.num_classes:
            raise ValueError(
                f"the pretrained weights of timm:{arch} have {cfg.num_classes} classes, not {num_classes}; "
                "pass checkpoint=FILE (--checkpoint) for a model trained with your number of classes"
            )
        hf_id = cfg.hf_hub_id
        if not hf_id and cfg.url and not _torch_hub_file(cfg.url).is_file():
            raise FileNotFoundError(
                f"pretrained weights for timm:{arch} are not in the local torch hub cache: expected "
                f"{_torch_hub_file(cfg.url)} (download {cfg.url} there on a machine with internet), "
                "or pass checkpoint=FILE (--checkpoint)"
            )
    try:
        with _hf_offline():
            net = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (FileNotFoundError, ConnectionError) as err:
        if not (pretrained or from_hub):
            raise
        what = "pretrained weights" if pretrained else "the model config"
        repo = hf_id or f"timm/{arch}"
        raise FileNotFoundError(
            f"{what} for timm:{arch} are not in the local Hugging Face cache {constants.HF_HUB_CACHE} "
            "(sinai never downloads). Either download them once on a machine with internet with "
            f"`hf download {repo}` (older huggingface_hub: `huggingface-cli download {repo}`) and copy that "
            "cache here (or point HF_HUB_CACHE/HF_HOME at it), or pass checkpoint=FILE (--checkpoint)"
        ) from err
    cfg = timm.data.resolve_model_data_config(net)
    return net, tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]), int(net.num_classes)


def _build_torchvision(
    arch: str,
    *,
    state: Mapping[str, torch.Tensor] | None,
    weights: str,
    num_classes: int | None,
    progress: bool,
) -> tuple[nn.Module, tuple[int, ...], tuple[float, ...], tuple[float, ...], int]:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if arch not in names:
        examples = ", ".join(n for n in ("resnet18", "resnet50", "vit_b_16", "convnext_tiny") if n in names)
        raise ValueError(
            f"unknown torchvision model {arch!r}; use a classifier name from "
            f"torchvision.models.list_models(module=torchvision.models) (e.g. {examples}), "
            "written as torchvision:<name>"
        )
    builder = tvm.get_model_builder(arch)
    try:
        default = tvm.get_model_weights(arch).DEFAULT
    except (ValueError, AttributeError, KeyError):
        default = None
    preset = dict(getattr(default.transforms, "keywords", {})) if default is not None else {}
    size = int(preset.get("crop_size", 224))
    mean = tuple(preset.get("mean", IMAGENET_MEAN))
    std = tuple(preset.get("std", IMAGENET_STD))
    if state is None and weights == "pretrained":
        if default is None:
            raise ValueError(
                f"torchvision has no pretrained weights for {arch!r}; "
                "pass checkpoint=FILE (--checkpoint) or weights='random'"
            )
        classes = len(default.meta.get("categories") or ()) or 1000
        if num_classes is not None and num_classes != classes:
            raise ValueError(
                f"the pretrained weights of torchvision:{arch} have {classes} classes, not {num_classes}; "
                "pass checkpoint=FILE (--checkpoint) for a model trained with your number of classes"
            )
        file = _torch_hub_file(default.url)
        if not file.is_file():
            raise FileNotFoundError(
                f"pretrained weights for torchvision:{arch} are not in the local torch hub cache: put "
                f"{file.name} (from {default.url}) at {file} (the folder is torch.hub.get_dir()/checkpoints, "
                "set by TORCH_HOME), or pass checkpoint=FILE (--checkpoint)"
            )
        net = builder(weights=default, progress=progress)
    else:
        classes = int(num_classes or 1000)
        net = builder(weights=None, num_classes=classes)
    return net, (3, size, size), mean, std, classes
