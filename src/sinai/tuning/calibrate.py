"""Calibration: the ``std`` of a one-kind defense whose clean-accuracy drop is a target (≈1% / ≈2%).

The papers compare defenses at a matched clean-accuracy drop (RFD section 4.1, SINAI section 5.1).
``calibrate`` bisects on ``std`` over a fixed image set. Every evaluation restarts the defense's noise
from the same seed (common random numbers): the same standard-normal draws are scaled by each
candidate ``std``, so the measured drop is close to monotone in ``std`` and the bisection is stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..defenses import Defense, protect
from ..evaluation.clean import clean_accuracy

# Upper end of the default search range per site kind, in that kind's units: pixels for input,
# activations elsewhere. Wide enough that every embedded model loses far more than 2% at the top.
DEFAULT_HIGH: dict[str, float] = {"input": 0.5, "feature": 10.0, "attn": 10.0, "gelu": 4.0, "relu": 4.0}


@dataclass(frozen=True)
class Calibration:
    """The calibrated defense and how close it came: ``reached`` is ``|drop - target| <= tolerance``."""

    defense: Defense
    kind: str
    target: float
    tolerance: float
    std: float
    base: float
    clean: float
    reached: bool
    steps: tuple[tuple[float, float], ...] = field(default=())  # (std, drop) in the order evaluated

    @property
    def drop(self) -> float:
        return self.base - self.clean

    def as_dict(self) -> dict[str, object]:
        return {
            "defense": self.defense.describe(),
            "kind": self.kind,
            "target": self.target,
            "tolerance": self.tolerance,
            "std": self.std,
            "base": self.base,
            "clean": self.clean,
            "drop": self.drop,
            "reached": self.reached,
            "steps": [list(s) for s in self.steps],
        }


def bisect_std(
    enough: Callable[[float], bool],
    low: float,
    high: float,
    *,
    steps: int,
    log: bool = False,
    stop: Callable[[], bool] = lambda: False,
) -> tuple[float, float]:
    """Narrow ``[low, high]`` around the smallest std at which ``enough(std)`` holds (monotone in std).

    Each of at most ``steps`` steps halves the interval at its midpoint (geometric mean with ``log``)
    and keeps the half where ``enough`` changes; ``stop()`` is asked before each step and ends the search
    early. Returns the final ``(low, high)``. The caller measures ``high`` first when it needs to know
    that the target is within reach.
    """
    for _ in range(steps):
        if stop():
            break
        mid = math.sqrt(low * high) if log else (low + high) / 2
        if enough(mid):
            high = mid
        else:
            low = mid
    return low, high


def one_kind(defense: Defense, model: nn.Module) -> tuple[Defense, str]:
    """``defense`` restricted to ``model``, checked to have exactly one site kind (what calibrate tunes)."""
    defense = defense.for_model(model)
    if not defense.randomized:
        raise ValueError(
            f"calibrate tunes a noise std, and {defense.describe()} has no noise; use a noise defense "
            "such as RND, FND or SINAI-Attn"
        )
    if len(defense.specs) != 1:
        raise ValueError(
            f"calibrate tunes one std: {defense.describe()} has {len(defense.specs)} site kinds on this "
            "model; use a one-kind defense such as RND, FND or SINAI-Attn (or compose one kind)"
        )
    return defense, next(iter(defense.specs))


def calibrate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    defense: Defense,
    *,
    drop: float,
    tolerance: float = 0.0025,
    low: float = 0.0,
    high: float | None = None,
    passes: int = 3,
    seed: int = 0,
    max_steps: int = 16,
    base: float | None = None,
    batch_size: int = 256,
    on_step: Callable[[float, float], None] | None = None,
) -> Calibration:
    """Find the ``std`` in ``[low, high]`` at which ``defense`` costs ``drop`` (± ``tolerance``) accuracy.

    ``drop`` and ``tolerance`` are fractions (0.01 = one percentage point). ``base`` is the undefended
    accuracy on ``images`` (measured when not given). When even ``high`` costs less than the target,
    the result has ``reached=False`` and ``std=high``: widen the range. ``on_step(std, drop)`` is told
    every evaluation (progress).
    """
    if not 0 < drop < 1:
        raise ValueError(f"drop must be a fraction in (0, 1) such as 0.01 for 1%, got {drop!r}")
    if not 0 < tolerance < drop:
        raise ValueError(f"tolerance must be in (0, drop), got {tolerance!r}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    defense, kind = one_kind(defense, model)
    spec = defense.specs[kind]
    high = DEFAULT_HIGH[kind] if high is None else high
    if not 0 <= low < high:
        raise ValueError(f"need 0 <= low < high for the std range, got low={low}, high={high}")
    if base is None:
        base = clean_accuracy(model, images, labels, passes=1, batch_size=batch_size).mean

    steps: list[tuple[float, float, float]] = []  # (std, drop, clean)

    def measure(std: float) -> float:
        candidate = replace(defense, specs={kind: replace(spec, std=std)})
        defended = protect(model, candidate, seed=seed)
        try:
            clean = clean_accuracy(defended, images, labels, passes=passes, batch_size=batch_size).mean
        finally:
            defended.remove()
        steps.append((std, base - clean, clean))
        if on_step is not None:
            on_step(std, base - clean)
        return base - clean

    if measure(high) >= drop - tolerance:
        bisect_std(
            lambda std: measure(std) >= drop,
            low,
            high,
            steps=max_steps - 1,
            stop=lambda: abs(steps[-1][1] - drop) <= tolerance,
        )
    best = min(steps, key=lambda s: (abs(s[1] - drop), s[0]))
    return Calibration(
        defense=replace(defense, specs={kind: replace(spec, std=best[0])}),
        kind=kind,
        target=drop,
        tolerance=tolerance,
        std=best[0],
        base=base,
        clean=best[2],
        reached=abs(best[1] - drop) <= tolerance,
        steps=tuple((s, d) for s, d, _ in steps),
    )
