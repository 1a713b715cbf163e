"""Adversarial training (PGD-AT, Madry et al. 2018) and the data bookkeeping of the embedded models.

A recipe with :class:`AdvTraining` trains on PGD examples crafted against the model being trained,
``min_theta E max_{||delta||_inf <= eps} CE(f(x + delta), y)`` (Madry et al. 2018, Sec. 2-3): every batch
is replaced by its PGD examples (random start, ``steps`` signed-gradient steps of size ``alpha``), and the
weights take one step on the cross-entropy of those examples only (no clean term, as Madry et al.).

The examples are crafted with ``torchattacks.PGD`` on the model in **eval mode** (torchattacks' default):
BatchNorm normalises with its running statistics while crafting, so the attack sees the same function the
deployed model computes and its 10 forward passes per batch do not move the running statistics; the weight
step that follows runs in train mode on the adversarial batch, so the running statistics are those of
adversarial batches (as TRADES' reference code does; crafting in train mode would instead attack batch
statistics no deployed model uses).

The embedded MNIST images (5000, :func:`sinai.models.data.mnist`) are split once into 4000 train / 1000
test images; every evaluation samples from the test split only. :func:`training_indices` says which
images a recipe trains on, as indices into the 5000 embedded images, so disjointness can be checked.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADV_METHODS",
    "HALF_SPLIT_SEED",
    "AdvTraining",
    "TrainData",
    "TrainingMethod",
    "embedded_split",
    "half_split",
    "parse_adv_options",
    "pgd_robust_accuracy",
    "select_training",
    "training_indices",
]

#: Adversarial-training methods a recipe may name.
ADV_METHODS = ("pgd",)
#: The options a ``<name>-at:<options>`` model name may carry.
ADV_OPTIONS = ("eps", "steps", "alpha")
#: Test images (a seeded class-covering sample of the test split) on which training measures the PGD-20
#: robust accuracy of an adversarially-trained model.
ROBUST_IMAGES = 200
#: Seed of the fixed, stratified split of the train split into two halves (``TrainConfig.half``).
HALF_SPLIT_SEED = 1


@dataclass(frozen=True)
class TrainData:
    """What a recipe trains and measures on: the (possibly subset) train split and the whole test split of
    the embedded MNIST images, on the training device, and the model cache a method that starts from
    another embedded model loads it from (``None``: the default cache)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    cache_dir: str | os.PathLike | None = None


@runtime_checkable
class TrainingMethod(Protocol):
    """What a recipe's training method (:class:`AdvTraining`, ``MfdvTraining``, ``SelectiveTraining``)
    supplies to :func:`sinai.models.embedded.train_embedded`, which runs the shared loop (data order,
    augmentation, AdamW + one-cycle schedule, progress) and calls these at its fixed points.

    A method is a frozen dataclass validated once in ``__post_init__``; its :meth:`key` enters the cache
    hash, and its fields are the options of the model's name (``mnist-cnn-at:eps=0.2``).
    """

    def key(self) -> dict:
        """JSON-able description of everything in the method that changes the trained weights."""

    def options(self, default: TrainingMethod) -> str:
        """The ``field=value,...`` text that turns the registered ``default`` into this method ('' if
        equal)."""

    @classmethod
    def parse_options(cls, text: str) -> dict:
        """The fields a name's ``:field=value,...`` sets (``ValueError``, one line, for anything else)."""

    def describe(self) -> str:
        """One line for progress bars and ``sinai train``."""

    def attach(self, model: nn.Module) -> None:
        """Add the method's own parameters, buffers or modules to a freshly built model, so that its cached
        ``state_dict`` loads (called before training and before loading)."""

    def prepare(self, model: nn.Module, data: TrainData, *, device: torch.device, progress: bool) -> dict:
        """Work before the main loop (e.g. start from another model's weights); returns metrics."""

    def loss(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of one batch in the main loop (model in train mode), and scalars to log."""

    def finish(self, model: nn.Module, data: TrainData) -> dict:
        """Metrics of the trained model (in eval mode), stored with its weights."""


def _tidy(value: float) -> float:
    """A float rounded to 12 significant digits, so that 2.5 * 0.1 / 10 and 0.025 hash alike."""
    return float(f"{value:.12g}")


@dataclass(frozen=True)
class AdvTraining:
    """PGD adversarial training: the l-inf ``eps`` ball, ``steps`` PGD steps of size ``alpha``.

    ``alpha=None`` means ``2.5 * eps / steps`` (Madry et al.'s rule of thumb, so that the steps can cross
    the ball); :attr:`step_size` is the value used. ``method`` is the attack that crafts the training
    examples (only ``"pgd"``).
    """

    method: str = "pgd"
    eps: float = 0.1
    steps: int = 10
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.method not in ADV_METHODS:
            raise ValueError(
                f"unknown adversarial training method {self.method!r}; choose one of {', '.join(ADV_METHODS)}"
            )
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps <= 1:
            raise ValueError(f"adversarial training eps is an l-inf radius in (0, 1], got {self.eps!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"adversarial training steps must be a positive int, got {self.steps!r}")
        if self.alpha is not None and (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not 0 < self.alpha <= 1
        ):
            raise ValueError(f"adversarial training alpha is a step size in (0, 1], got {self.alpha!r}")

    @property
    def step_size(self) -> float:
        """The PGD step size: ``alpha``, or ``2.5 * eps / steps`` when it is ``None``."""
        return _tidy(self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps)

    def key(self) -> dict:
        """What determines the training (for the cache key): alpha resolved, floats tidied."""
        return {"method": self.method, "eps": _tidy(self.eps), "steps": self.steps, "alpha": self.step_size}

    def describe(self) -> str:
        """'PGD-10, linf eps 0.1, alpha 0.025'."""
        return f"{self.method.upper()}-{self.steps}, linf eps {_tidy(self.eps):g}, alpha {self.step_size:g}"

    def options(self, default: AdvTraining) -> str:
        """The ``eps=..,steps=..,alpha=..`` text that turns ``default`` into this recipe ('' if equal);
        alpha is written only where it differs from ``2.5 * eps / steps``."""
        parts = []
        if _tidy(self.eps) != _tidy(default.eps):
            parts.append(f"eps={_tidy(self.eps):g}")
        if self.steps != default.steps:
            parts.append(f"steps={self.steps}")
        if self.step_size != _tidy(2.5 * self.eps / self.steps):
            parts.append(f"alpha={self.step_size:g}")
        return ",".join(parts)

    @classmethod
    def parse_options(cls, text: str) -> dict:
        """'eps=0.2,steps=5' -> {'eps': 0.2, 'steps': 5} (:func:`parse_adv_options`)."""
        return parse_adv_options(text)

    def attach(self, model: nn.Module) -> None:
        """PGD-AT adds nothing to the architecture."""

    def prepare(self, model: nn.Module, data: TrainData, *, device: torch.device, progress: bool) -> dict:
        """Nothing to prepare: training starts from the recipe's random initialisation."""
        return {}

    def loss(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of the batch's PGD examples only (Madry et al. 2018, Sec. 2-3), crafted in eval
        mode (torchattacks puts the model back in train mode)."""
        return F.cross_entropy(model(self.crafter(model)(xb, yb)), yb), {}

    def finish(self, model: nn.Module, data: TrainData) -> dict:
        """The recipe and the PGD-20 robust accuracy at the training eps on :data:`ROBUST_IMAGES`
        (a seeded class-covering sample of the test split)."""
        from sinai.models.data import select_images

        pick = select_images(data.y_test.cpu(), min(ROBUST_IMAGES, len(data.y_test)), seed=0, num_classes=10)
        pick = pick.to(data.y_test.device)
        robust = pgd_robust_accuracy(model, data.x_test[pick], data.y_test[pick], eps=self.eps, steps=20)
        return {
            "adversarial_training": {**self.key(), "craft_mode": "eval"},
            "robust_accuracy": {
                "attack": "pgd",
                "steps": 20,
                "eps": self.key()["eps"],
                "images": len(pick),
                "accuracy": robust,
            },
        }

    def crafter(self, model: nn.Module):
        """A ``torchattacks.PGD`` that crafts this recipe's training examples on ``model`` in eval mode."""
        import torchattacks

        attack = torchattacks.PGD(
            model, eps=self.eps, alpha=self.step_size, steps=self.steps, random_start=True
        )
        attack.set_model_training_mode(model_training=False)  # eval mode while crafting (the module doc)
        return attack


def parse_adv_options(text: str) -> dict[str, float | int]:
    """'eps=0.2,steps=5' -> {'eps': 0.2, 'steps': 5}: the options of a ``mnist-cnn-at:<options>`` name."""
    found: dict[str, float | int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in ADV_OPTIONS:
            raise ValueError(
                f"expected {', '.join(o + '=...' for o in ADV_OPTIONS)} after ':' in an "
                f"adversarially-trained model name, got {item!r}"
            )
        if key in found:
            raise ValueError(f"option {key!r} given twice in {text!r}")
        try:
            found[key] = int(value) if key == "steps" else float(value)
        except ValueError:
            kind = "an integer" if key == "steps" else "a number"
            raise ValueError(f"{key} must be {kind}, got {value!r}") from None
        if key != "steps" and not math.isfinite(found[key]):
            raise ValueError(f"{key} must be a finite number, got {value!r}")
    if not found:
        raise ValueError(f"no options after ':' (expected e.g. eps=0.2,steps=10), got {text!r}")
    return found


def pgd_robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 0.1,
    steps: int = 20,
    alpha: float | None = None,
    batch_size: int = 250,
    seed: int = 0,
) -> float:
    """Share of ``(x, y)`` still classified correctly after ``torchattacks.PGD`` (l-inf ``eps``, random
    start, ``steps`` steps of ``alpha``, default ``2.5 * eps / steps``) on ``model`` in eval mode.

    Seeded (the random starts), and the caller's global RNG state is left untouched.
    """
    import torchattacks

    step = alpha if alpha is not None else 2.5 * eps / steps
    attack = torchattacks.PGD(model, eps=eps, alpha=step, steps=steps, random_start=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            adv = attack(xb, yb)
            with torch.no_grad():
                correct += (model(adv).argmax(1) == yb).sum().item()
    model.train(was_training)
    return correct / max(len(y), 1)


def embedded_split() -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) into the 5000 embedded MNIST images: ``mnist("train")`` / ``mnist("test")``
    hold exactly these images, in this order."""
    from sinai.models import data

    _, labels = data._mnist_arrays()
    return data._stratified_split(labels, data.MNIST_TEST_FRACTION, data.MNIST_SPLIT_SEED)


def half_split(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (half 0, half 1) in ``labels`` (the train split's): a fixed, seeded, stratified halving."""
    from sinai.models.data import _stratified_split

    second, first = _stratified_split(labels, 0.5, HALF_SPLIT_SEED)
    return first, second


def select_training(
    labels: torch.Tensor, half: int | None, train_images: int | None, gen: torch.Generator
) -> torch.Tensor | None:
    """Positions in the train split a recipe trains on (``None`` = all of them).

    ``half`` picks one half of :func:`half_split` (it draws nothing from ``gen``); then ``train_images``
    keeps a random subset drawn from ``gen`` (the order the original recipes used, so their weights
    are unchanged).
    """
    keep = None if half is None else half_split(labels)[half]
    n = len(labels) if keep is None else len(keep)
    if train_images is not None and train_images < n:
        pick = torch.randperm(n, generator=gen)[:train_images]
        keep = pick if keep is None else keep[pick]
    return keep


def training_indices(name: str) -> torch.Tensor:
    """Indices into the 5000 embedded MNIST images that the embedded model ``name`` trains on, sorted."""
    from sinai.models.data import mnist
    from sinai.models.embedded import _resolve

    cfg = _resolve(name)[1].train
    labels = mnist("train").labels
    keep = select_training(labels, cfg.half, cfg.train_images, torch.Generator().manual_seed(cfg.seed))
    train_idx, _ = embedded_split()
    return (train_idx if keep is None else train_idx[keep]).sort().values
