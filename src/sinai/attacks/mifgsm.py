"""MI-FGSM (Dong et al. 2018): PGD with momentum on the normalised gradient; seed 001 Table 1.

torchattacks' ``MIFGSM`` (linf only; it starts from the clean image).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_count, check_positive
from .base import register_attack
from .threat import ThreatModel
from .whitebox import WhiteBoxAttack, step_size


@register_attack("mifgsm")
class MIFGSM(WhiteBoxAttack):
    """``steps`` momentum steps of size ``alpha`` (default 2.5 * eps / steps), momentum ``decay``."""

    norms = ("linf",)

    def __init__(self, *, steps: int = 10, alpha: float | None = None, decay: float = 1.0) -> None:
        self.steps = check_count("steps", steps, 1, "gradient steps")
        self.alpha = None if alpha is None else check_positive("alpha", alpha)
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
            raise ValueError(f"decay must be a number >= 0 (the momentum factor), got {decay!r}")
        self.decay = float(decay)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel
    ) -> torch.Tensor:
        import torchattacks  # imported on use: the library costs seconds to import

        alpha = step_size(self.alpha, threat.eps, self.steps)
        return torchattacks.MIFGSM(model, eps=threat.eps, alpha=alpha, steps=self.steps, decay=self.decay)(
            x, y
        )
