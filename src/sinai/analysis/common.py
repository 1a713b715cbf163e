"""Helpers the analyses share: rows, the robust-accuracy check, std calibration, checks, CSV."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..attacks.threat import ThreatModel
from ..defenses import Defense
from ..defenses.spec import check_ratio, check_std
from ..evaluation.clean import clean_accuracy
from ..evaluation.config import EvalConfig
from ..evaluation.protocol import evaluate
from ..tuning.calibrate import bisect_std


def _checked(values: Iterable[float], what: str, check: Callable[[float], object]) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out:
        raise ValueError(f"give at least one {what}")
    for value in out:
        check(value)
    return out


def check_stds(stds: Iterable[float]) -> tuple[float, ...]:
    """The stds as floats, or a ``ValueError`` naming the first one that is not a finite number >= 0."""
    return _checked(stds, "std", check_std)


def check_ratios(ratios: Iterable[float]) -> tuple[float, ...]:
    """The ratios as floats, or a ``ValueError`` naming the first one outside [0, 1]."""
    return _checked(ratios, "ratio", check_ratio)


@dataclass(frozen=True)
class Row:
    """Base of the analyses' rows: a frozen dataclass whose fields are its CSV columns."""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class RobustCheck:
    """The robust-accuracy check the sweeps share: Square at ``budget`` queries on the images ``x, y``
    within ``threat``, through :func:`~sinai.evaluation.protocol.evaluate` (the Oracle, its votes)."""

    x: torch.Tensor
    y: torch.Tensor
    threat: ThreatModel
    budget: int = 100

    def __call__(self, model: nn.Module, defense: Defense | None = None, *, seed: int = 0) -> float:
        """Robust accuracy of ``model`` protected by ``defense`` (``None``: as it is), noise and attack
        seeded by ``seed``."""
        config = EvalConfig(
            attack="square",
            defense=defense if defense is not None else Defense(name="none"),
            threat=self.threat,
            budgets=(self.budget,),
            seed=seed,
            passes=1,
        )
        result = evaluate(model, self.x, self.y, config, batch_size=256, progress=False)
        return result.robust_accuracy(self.budget)


def calibrate_std(
    accuracy_at: Callable[[float], float],
    base: float,
    drop: float,
    *,
    lo: float = 1e-3,
    hi: float = 8.0,
    steps: int = 10,
) -> float:
    """The std in [lo, hi] at which ``accuracy_at(std)`` is ``base - drop`` (bisection in log space).

    Returns ``hi`` when even ``hi`` costs less than ``drop``; accuracy is assumed to fall with std.
    """
    if not 0 < drop < 1:
        raise ValueError(f"drop must be in (0, 1), got {drop!r}")

    def enough(std: float) -> bool:
        return not accuracy_at(std) > base - drop

    if not enough(hi):
        return hi
    lo, hi = bisect_std(enough, lo, hi, steps=steps, log=True)
    return math.sqrt(lo * hi)


def noisy_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int) -> float:
    """Mean clean accuracy over ``passes`` noisy passes (the model owns its seeded noise)."""
    return clean_accuracy(model, x, y, passes=passes).mean


def std_at_drop(stds: Sequence[float], accs: Sequence[float], base: float, drop: float) -> float | None:
    """The std at which accuracy first falls ``drop`` below ``base``, linearly interpolated on the sweep;
    ``None`` when it never does."""
    pairs = sorted(zip(stds, accs, strict=True))
    target = base - drop
    prev_s, prev_a = 0.0, base
    for std, acc in pairs:
        if acc <= target:
            if prev_a == acc:
                return std
            return prev_s + (std - prev_s) * (prev_a - target) / (prev_a - acc)
        prev_s, prev_a = std, acc
    return None


def write_csv(path: Path, rows: Sequence[Row]) -> Path:
    """Write ``rows`` (of one type) as CSV under their ``as_dict()`` keys; floats with 6 significant
    digits, ``None`` (not measured) as an empty cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return path
    dicts = [row.as_dict() for row in rows]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dicts[0]))
        writer.writeheader()
        for row in dicts:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return path
