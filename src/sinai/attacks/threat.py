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
    if norm != "linf":
        return delta.norm(dim=1)
    return (delta.abs() if delta.requires_grad else delta.abs_()).amax(1)  # in place unless autograd needs it


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` (linf or l2) intersected with [0, 1]."""
    delta = x_adv - x
    if delta.requires_grad:  # autograd keeps the intermediate values
        if norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            delta = delta * (eps / _row_norms(delta)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0)
    # the same values, computed in place in the new tensor ``delta`` (no copies)
    if norm == "linf":
        delta.clamp_(-eps, eps)
    else:
        delta.mul_((eps / _row_norms(delta)).clamp(max=1.0))
    return delta.add_(x).clamp_(0.0, 1.0)


def _row_norms(delta: torch.Tensor) -> torch.Tensor:
    """Per-row l2 norm of ``delta`` (at least 1e-12), shaped to broadcast against it."""
    return delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))


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

    def project_probes(self, probes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Probes (B, m, C, H, W) around the images ``x`` (B, C, H, W) projected like ``project``, as
        (B * m, C, H, W): for linf ``x`` broadcasts over the probes (no copies); l2 needs a norm per probe."""
        if self.norm == "linf":
            return self.project(probes, x[:, None]).flatten(0, 1)
        return self.project(probes.flatten(0, 1), x.repeat_interleave(probes.shape[1], 0))

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-row mask: ``x_adv`` lies in the eps-ball around ``x`` (with the float slack)."""
        return self.distance(x_adv, x) <= self.radius

    def to_dict(self) -> dict[str, object]:
        """``{"norm": ..., "eps": ...}`` (JSON-able)."""
        return {"norm": self.norm, "eps": self.eps}
