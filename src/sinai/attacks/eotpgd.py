"""EOT-PGD (Athalye et al. 2018): PGD on the mean gradient of ``eot_iter`` noisy forwards per step.

torchattacks' ``EOTPGD`` (linf). Seed 001 Tables 8-9 (EOT-20) and seed 004 (EOT-80) attack the noisy
models this way; the evaluation's ``eot`` = M multiplies in (each of the ``eot_iter`` forwards is then
itself an M-sample mean).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_count, check_positive
from .base import register_attack
from .threat import ThreatModel
from .whitebox import WhiteBoxAttack, step_size


@register_attack("eotpgd")
class EOTPGD(WhiteBoxAttack):
    """``steps`` steps of size ``alpha`` (default 2.5 * eps / steps) on gradients averaged over
    ``eot_iter`` noisy samples."""

    norms = ("linf",)

    def __init__(
        self, *, steps: int = 20, alpha: float | None = None, eot_iter: int = 10, random_start: bool = True
    ) -> None:
        self.steps = check_count("steps", steps, 1, "gradient steps")
        self.alpha = None if alpha is None else check_positive("alpha", alpha)
        self.eot_iter = check_count("eot_iter", eot_iter, 1, "noisy gradients averaged per step")
        self.random_start = bool(random_start)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel
    ) -> torch.Tensor:
        import torchattacks  # imported on use: the library costs seconds to import

        alpha = step_size(self.alpha, threat.eps, self.steps)
        attack = torchattacks.EOTPGD(
            model, eps=threat.eps, alpha=alpha, steps=self.steps, eot_iter=self.eot_iter,
            random_start=self.random_start,
        )  # fmt: skip
        return attack(x, y)
