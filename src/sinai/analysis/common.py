"""Helpers the analyses share: robust accuracy through the protocol, std calibration, checks, CSV."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..defenses import Defense
from ..evaluation.clean import clean_accuracy
from ..evaluation.protocol import evaluate


def check_stds(stds: Iterable[float]) -> tuple[float, ...]:
    """The stds as floats, or a ``ValueError`` naming the first one that is not a finite number >= 0."""
    out = tuple(float(s) for s in stds)
    if not out:
        raise ValueError("give at least one std")
    for std in out:
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"std must be a finite number >= 0 (a standard deviation), got {std!r}")
    return out


def check_ratios(ratios: Iterable[float]) -> tuple[float, ...]:
    """The ratios as floats, or a ``ValueError`` naming the first one outside [0, 1]."""
    out = tuple(float(r) for r in ratios)
    if not out:
        raise ValueError("give at least one ratio")
    for ratio in out:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(
                f"ratio must be in [0, 1] (the fraction of logits that get noise), got {ratio!r}"
            )
    return out


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    defense: Defense | None,
    budget: int,
    eps: float,
    norm: str = "linf",
    seed: int = 0,
) -> float:
    """Robust accuracy under Square at ``budget`` queries, through :func:`evaluate` (oracle, votes)."""
    result = evaluate(
        model,
        x,
        y,
        attack="square",
        defense=defense,
        norm=norm,
        eps=eps,
        budgets=(budget,),
        seed=seed,
        passes=1,
        batch_size=256,
        progress=False,
    )
    return result.robust_accuracy(budget)


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
    if accuracy_at(hi) > base - drop:
        return hi
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if accuracy_at(mid) > base - drop:
            lo = mid
        else:
            hi = mid
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


def write_csv(path: Path, rows: Sequence[Mapping[str, object]]) -> Path:
    """Write ``rows`` (dicts with the same keys) as CSV; floats with 6 significant digits."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        path.write_text("")
        return path
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return path
