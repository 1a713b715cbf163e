"""PGD (Madry et al. 2018): iterated projected gradient steps on the cross-entropy; seed 001's PGD-20.

torchattacks' ``PGD`` (linf) and ``PGDL2`` (l2), with a random start in the ball. Through the Oracle's
differentiable view the gradient is that of the deployed, noisy model; ``eot`` = M averages M noisy
samples per step (EOT-PGD by the evaluation's ``eot``; :mod:`.eotpgd` averages gradients instead).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_count, check_positive
from .base import register_attack
from .threat import ThreatModel
from .whitebox import WhiteBoxAttack, step_size


@register_attack("pgd")
class PGD(WhiteBoxAttack):
    """``steps`` steps of size ``alpha`` (default 2.5 * eps / steps), from a random start when
    ``random_start``."""

    def __init__(self, *, steps: int = 20, alpha: float | None = None, random_start: bool = True) -> None:
        self.steps = check_count("steps", steps, 1, "gradient steps")
        self.alpha = None if alpha is None else check_positive("alpha", alpha)
        self.random_start = bool(random_start)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel
    ) -> torch.Tensor:
        import torchattacks  # imported on use: the library costs seconds to import

        alpha = step_size(self.alpha, threat.eps, self.steps)
        cls = torchattacks.PGD if threat.norm == "linf" else torchattacks.PGDL2
        return cls(model, eps=threat.eps, alpha=alpha, steps=self.steps, random_start=self.random_start)(x, y)
