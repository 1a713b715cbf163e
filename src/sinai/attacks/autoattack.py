"""AutoAttack (Croce & Hein 2020): the parameter-free ensemble; seed 001 Table 1's last column.

The authors' code, packaged as ``pyautoattack`` (MIT). ``version="standard"``: APGD-CE, APGD-T,
FAB-T, Square; ``version="rand"``: APGD-CE and APGD-DLR with EOT over 20 samples, the version for
randomized defenses.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .base import register_attack
from .threat import ThreatModel
from .whitebox import WhiteBoxAttack

VERSIONS = ("standard", "rand")


@register_attack("autoattack")
class AutoAttack(WhiteBoxAttack):
    """The ``version`` of AutoAttack ("standard" or "rand") at the threat's norm and eps."""

    def __init__(self, *, version: str = "standard") -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {', '.join(VERSIONS)}, got {version!r}")
        self.version = version

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel
    ) -> torch.Tensor:
        from pyautoattack import AutoAttack as _AutoAttack  # imported on use (seconds to import)

        norm = "Linf" if threat.norm == "linf" else "L2"
        seed = int(torch.randint(0, 2**31 - 1, ()).item())  # from the run's seeded generator
        attack = _AutoAttack(
            model, eps=threat.eps, norm=norm, version=self.version, device=x.device, seed=seed
        )
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        x_adv, _labels = attack.run_standard_evaluation(x, y, batch_size=len(x))
        return x_adv
