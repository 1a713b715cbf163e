"""C&W-l2 (Carlini & Wagner 2017) with a binary search on the constant c; seed 001 Table 1, seed 004.

foolbox 3's ``L2CarliniWagnerAttack``: a minimum-norm attack, so its images are judged as found (not
projected): one lying outside the l2 ball does not count, and the store keeps the l2 norm of every
image it found (the report's median l2). ``confidence`` is kappa (seed 004 sweeps 0, 0.1, 1, 2, 5).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_count, check_positive
from .base import register_attack
from .threat import ThreatModel
from .whitebox import WhiteBoxAttack


@register_attack("cw")
class CW(WhiteBoxAttack):
    """``binary_search_steps`` values of c, ``steps`` Adam steps of ``stepsize`` each, margin kappa =
    ``confidence``."""

    norms = ("l2",)
    projected = False

    def __init__(
        self,
        *,
        steps: int = 100,
        binary_search_steps: int = 5,
        stepsize: float = 0.05,
        confidence: float = 0.0,
        initial_const: float = 1e-3,
    ) -> None:
        self.steps = check_count("steps", steps, 1, "Adam steps per value of c")
        self.binary_search_steps = check_count("binary_search_steps", binary_search_steps, 1, "values of c")
        self.stepsize = check_positive("stepsize", stepsize)
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or confidence < 0:
            raise ValueError(f"confidence must be a number >= 0 (the margin kappa), got {confidence!r}")
        self.confidence = float(confidence)
        self.initial_const = check_positive("initial_const", initial_const)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel
    ) -> torch.Tensor:
        import foolbox  # imported on use: the library costs seconds to import

        fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x.device)
        attack = foolbox.attacks.L2CarliniWagnerAttack(
            binary_search_steps=self.binary_search_steps, steps=self.steps, stepsize=self.stepsize,
            confidence=self.confidence, initial_const=self.initial_const,
        )  # fmt: skip
        _raw, clipped, _success = attack(fmodel, x, y, epsilons=None)
        return clipped
