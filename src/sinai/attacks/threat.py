"""The threat model of an evaluation: an eps-ball in linf or l2 around each clean image, inside [0, 1].

``ThreatModel(norm, eps)`` is validated once, where it is made; the Oracle owns it (only candidates
inside the ball can be successes) and every attack reads it from the Oracle. The two norm functions
below are the only implementations of the per-image norm and of the projection in the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NORMS = ("linf", "l2")
#: Slack of the eps-ball check, relative and absolute (float32 rounding of x + delta is ~6e-8).
EPS_TOLERANCE = 1e-6


def distance(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row linf or l2 norm of ``x_adv - x``."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` (linf or l2) intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * (eps / norms).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


@dataclass(frozen=True)
class ThreatModel:
    """Perturbations of at most ``eps`` in the ``norm`` ("linf" or "l2"), pixels in [0, 1]."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; use one of {', '.join(NORMS)}")
        eps = self.eps
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        if self.norm == "linf" and eps > 1:
            raise ValueError(
                f"linf eps {eps} is larger than the pixel range [0, 1]; pixels are in [0, 1] units"
            )
        object.__setattr__(self, "eps", float(eps))

    @property
    def radius(self) -> float:
        """``eps`` with its float slack: the largest distance that still counts as inside."""
        return self.eps * (1 + EPS_TOLERANCE) + EPS_TOLERANCE

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-row norm of ``x_adv - x``."""
        return distance(x_adv, x, self.norm)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_adv`` projected onto the eps-ball around ``x`` and [0, 1]."""
        return project(x_adv, x, self.norm, self.eps)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-row mask: ``x_adv`` lies in the eps-ball around ``x`` (with the float slack)."""
        return self.distance(x_adv, x) <= self.radius

    def to_dict(self) -> dict[str, object]:
        """``{"norm": ..., "eps": ...}`` (JSON-able)."""
        return {"norm": self.norm, "eps": self.eps}
