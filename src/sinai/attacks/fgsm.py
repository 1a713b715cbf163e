"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps; seed 001 Table 1's FGSM column.

linf is torchattacks' ``FGSM``; l2 is the fast gradient method, one normalised-gradient step of eps
(torchattacks' ``PGDL2`` with one step and no random start).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_attack
from .threat import ThreatModel
from .whitebox import WhiteBoxAttack


@register_attack("fgsm")
class FGSM(WhiteBoxAttack):
    """Single-step attack: the reference point of the gradient-masking check (iterative must beat it)."""

    def __init__(self) -> None:
        pass

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel
    ) -> torch.Tensor:
        import torchattacks  # imported on use: the library costs seconds to import

        if threat.norm == "linf":
            return torchattacks.FGSM(model, eps=threat.eps)(x, y)
        return torchattacks.PGDL2(model, eps=threat.eps, alpha=threat.eps, steps=1, random_start=False)(x, y)
