"""What the commands share: option declarations, the parsing of option text, and model/data loading.

Option text is parsed here into plain values (ints, fractions, keyword dicts) and nothing more: the
library checks ranges and combinations where the values enter it (``EvalConfig``, ``calibrate``,
``tune``), so each parameter is validated once. A ``ValueError`` from a parser becomes click's
"Invalid value for '--option'" message.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import click
import torch

MODELS_HELP = (
    "mnist-cnn, mnist-vit, mnist-cnn-at[:eps=E,steps=S,alpha=A] (PGD-AT), mnist-cnn-surrogate, "
    "mnist-cnn-mfdv[:lambda1=L] / mnist-vit-mfdv (MFDV-SNN), mnist-cnn-selective[:k=K] "
    "(SINAI-selective), timm:<name> or torchvision:<name>"
)


# ------------------------------------------------------------------------------------ text parsing


def names(text: str | None) -> tuple[str, ...] | None:
    """'a, b,,c' -> ('a', 'b', 'c'); None (the option's default) for an empty or missing text."""
    found = tuple(v.strip() for v in (text or "").split(",") if v.strip())
    return found or None


def numbers(text: str) -> tuple[float, ...]:
    """'0,0.5,1' -> (0.0, 0.5, 1.0), in the order given."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def fractions(text: str) -> tuple[float, ...]:
    """'0.02,0.01' -> (0.01, 0.02): distinct, sorted; the library checks they lie in (0, 1)."""
    values = tuple(sorted(set(numbers(text))))
    if not values:
        raise ValueError(f"expected fractions like 0.01,0.02, got {text!r}")
    return values


def budgets(text: str) -> tuple[int, ...]:
    """'10000,1000' -> (1000, 10000): distinct, sorted; ``EvalConfig`` checks they are positive."""
    try:
        return tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise ValueError(f"budgets must be integers like 1000,10000, got {text!r}") from None


def key_values(text: str) -> dict[str, object]:
    """'a=1,b=0.5,c=dct,d=true' -> {'a': 1, 'b': 0.5, 'c': 'dct', 'd': True}: numbers and booleans
    parsed, the rest kept as text (the library checks each value's type). A key given twice is an error."""
    parsed: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        if key in parsed:
            raise ValueError(f"{key} is given twice in {text!r}; give each key once")
        parsed[key] = _scalar(value.strip())
    return parsed


def _scalar(value: str) -> object:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            continue
    return {"true": True, "false": False}.get(value.lower(), value)


def fidelity(text: str) -> object:
    """'50:200' -> Fidelity(images=50, budget=200)."""
    from ..tuning.tune import Fidelity

    images, _, budget = text.partition(":")
    try:
        images_n, budget_n = int(images), int(budget)
    except ValueError:
        raise ValueError(f"expected IMAGES:BUDGET such as 50:200, got {text!r}") from None
    return Fidelity(images_n, budget_n)


def parsed(parse: Callable[[str], object]) -> Callable[[click.Context, click.Parameter, object], object]:
    """A click callback: ``parse`` applied to the option's text, its ``ValueError`` a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: object) -> object:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None

    return callback


# ------------------------------------------------------------------------------------ model and data


@dataclass(frozen=True)
class ModelSource:
    """Where a command's model and images come from (the --model ... --data-root options)."""

    name: str
    device: torch.device
    cache_dir: str | None = None
    checkpoint: str | None = None
    weights: str = "pretrained"
    num_classes: int | None = None
    data: str | None = None
    data_root: str | None = None

    def load(self) -> tuple[object, str, object]:
        """The model, its dataset's name and the dataset (checked to fit the model's input)."""
        from ..models.data import load_dataset
        from ..models.zoo import default_dataset, load_model

        model = load_model(
            self.name, checkpoint=self.checkpoint, weights=self.weights, num_classes=self.num_classes,
            device=self.device, cache_dir=self.cache_dir,
        )  # fmt: skip
        data = self.data or default_dataset(self.name, num_classes=model.num_classes)
        dataset = load_dataset(data, root=self.data_root, image_size=model.input_shape[-1])
        if tuple(dataset.input_shape) != tuple(model.input_shape):
            raise ValueError(
                f"{dataset.name} images have shape {dataset.input_shape}, "
                f"but {model.name} takes {model.input_shape}; "
                "pick the model's dataset with --data, or a model built for this input size"
            )
        return model, data, dataset


@dataclass(frozen=True)
class Loaded:
    """A model with ``n`` seeded class-covering images of its dataset (on the CPU)."""

    model: object
    data: str
    dataset: object
    indices: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor


def load_model_and_images(source: ModelSource, images: int, seed: int) -> Loaded:
    """The model of ``source`` and ``images`` images of its dataset chosen by ``select_images``."""
    from ..checks import check_count
    from ..models.data import select_images

    check_count("--images", images, 1, "images to evaluate, covering every class")
    model, data, dataset = source.load()
    chosen = select_images(dataset.labels, images, seed, dataset.num_classes)
    return Loaded(model, data, dataset, chosen, dataset.load(chosen), dataset.labels[chosen])


# ------------------------------------------------------------------------------------ declarations


def _stack(fn: Callable, options: Sequence[Callable]) -> Callable:
    for option in reversed(options):
        fn = option(fn)
    return fn


def device_options(fn: Callable) -> Callable:
    """--device and --cache-dir; the command gets ``device`` (a resolved torch.device) and ``cache_dir``."""

    @functools.wraps(fn)
    def wrapper(*args: object, device: str, cache_dir: str | None, **kwargs: object) -> object:
        from ..device import resolve_device

        return fn(*args, device=resolve_device(device), cache_dir=cache_dir, **kwargs)

    return _stack(
        wrapper,
        [
            click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."),
            click.option(
                "--cache-dir",
                type=click.Path(file_okay=False),
                default=None,
                help="Where trained embedded models are cached "
                "(default: $SINAI_CACHE_DIR or the user cache).",
            ),
        ],
    )


def precision_options(fn: Callable) -> Callable:
    """--bf16 and --channels-last; the command gets ``precision`` (a
    :class:`~sinai.bench.precision.Precision`)."""

    @functools.wraps(fn)
    def wrapper(*args: object, bf16: bool, channels_last: bool, **kwargs: object) -> object:
        from ..bench.precision import Precision

        return fn(*args, precision=Precision(bf16=bf16, channels_last=channels_last), **kwargs)

    return _stack(
        wrapper,
        [
            click.option(
                "--bf16", is_flag=True, help="Run every timed forward under bfloat16 autocast (for GPUs)."
            ),
            click.option(
                "--channels-last", is_flag=True, help="Models and images in channels-last memory format."
            ),
        ],
    )


def model_option(default: str | tuple[str, ...], help: str = MODELS_HELP) -> Callable:
    """--model; a tuple default makes it repeatable (``model_name`` is then a tuple)."""
    multiple = isinstance(default, tuple)
    return click.option(
        "--model", "model_name", default=default, multiple=multiple, show_default=True,
        help=help + ("; repeat for several." if multiple else "."),
    )  # fmt: skip


def weights_option(
    default: str = "pretrained",
    help: str = "pretrained: the trained weights (embedded cache, --checkpoint or the local Hugging Face "
    "cache); random: untrained, e.g. for timing.",
) -> Callable:
    return click.option(
        "--weights",
        type=click.Choice(["pretrained", "random"]),
        default=default,
        show_default=True,
        help=help,
    )


_SOURCE_OPTIONS = (
    click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="State-dict file."),
    weights_option(),
    click.option("--num-classes", type=int, default=None, help="Head size of timm/torchvision models."),
    click.option("--data", default=None, help="mnist, cifar10 or imagenet (default: the model's own)."),
    click.option("--data-root", type=click.Path(), default=None, help="Root folder of cifar10 / imagenet."),
)


def model_options(default: str | tuple[str, ...]) -> Callable:
    """--model, --checkpoint, --weights, --num-classes, --data, --data-root, --device, --cache-dir.

    The command gets ``source`` (a :class:`ModelSource`), or ``sources`` (one per --model) when
    ``default`` is a tuple of names.
    """

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(
            *args: object, model_name: str | tuple[str, ...], checkpoint: str | None, weights: str,
            num_classes: int | None, data: str | None, data_root: str | None, device: torch.device,
            cache_dir: str | None, **kwargs: object,
        ) -> object:  # fmt: skip
            source = ModelSource(
                name="", device=device, cache_dir=cache_dir, checkpoint=checkpoint, weights=weights,
                num_classes=num_classes, data=data, data_root=data_root,
            )  # fmt: skip
            if isinstance(model_name, tuple):
                return fn(*args, sources=[replace(source, name=n) for n in model_name], **kwargs)
            return fn(*args, source=replace(source, name=model_name), **kwargs)

        return _stack(device_options(wrapper), [model_option(default), *_SOURCE_OPTIONS])

    return decorate


def seed_option(help: str = "Seed of the image selection, noise and attack.") -> Callable:
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def writable_folder(text: str) -> str:
    """``text`` if it names a folder sinai can create or write into; a ``ValueError`` saying why not
    (a file in the way, no write permission) otherwise, before any work is done."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{text} is a file, not a folder; give a folder to write into")
    existing = path
    while not existing.exists() and existing.parent != existing:  # where the folder would be made
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"cannot make folder {text}: {existing} is a file")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot write to {text}: {existing} is read-only for this user; give another folder"
        )
    return text


def out_option(default: str, help: str = "Output folder (a finished run there is resumed).") -> Callable:
    """--out: a folder checked to be writable when the option is read (a read-only one fails at once)."""
    return click.option(
        "--out", type=click.Path(file_okay=False), default=default, show_default=True, help=help,
        callback=parsed(writable_folder),
    )  # fmt: skip


def passes_option(fn: Callable) -> Callable:
    return click.option(
        "--passes", type=int, default=3, show_default=True, help="Noisy passes per clean accuracy (M)."
    )(fn)
