"""n-pixel attack (Su et al. 2019): differential evolution over the values of ``pixels`` pixels; seed 004.

torchattacks' ``OnePixel``. It changes whole pixels, so it is defined for the l2 threat only (a pixel
moved by up to 1 is an l2 step of up to 1: ``pixels`` <= eps^2 always fits); it reads the model's
probabilities, with the model's noise on.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_count
from .base import register_attack
from .threat import ThreatModel
from .whitebox import WhiteBoxAttack


@register_attack("npixel")
class NPixel(WhiteBoxAttack):
    """``pixels`` pixels, ``steps`` generations of a population of ``popsize`` per pixel."""

    norms = ("l2",)
    gradients = False

    def __init__(self, *, pixels: int = 1, steps: int = 10, popsize: int = 10) -> None:
        self.pixels = check_count("pixels", pixels, 1, "pixels changed")
        self.steps = check_count("steps", steps, 1, "generations of the evolution")
        self.popsize = check_count("popsize", popsize, 1, "candidates per pixel")

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel
    ) -> torch.Tensor:
        import torchattacks  # imported on use: the library costs seconds to import

        attack = torchattacks.OnePixel(model, pixels=self.pixels, steps=self.steps, popsize=self.popsize)
        return attack(x, y)
