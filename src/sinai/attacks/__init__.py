"""Attacks, one per file, all through the Oracle: query-based (score and decision), white-box
(gradients through the deployed model, from torchattacks / foolbox / autoattack) and transfer."""

from __future__ import annotations

from .base import Attack, attack_class, is_attack, list_attacks, make_attack, margin_loss, register_attack
from .oracle import Oracle, QueryRules
from .threat import NORMS, ThreatModel, distance, project

# Importing the attack modules registers their attacks: this order is the order of ATTACKS
# (score-based, decision-based, white-box, transfer).
# isort: off
from . import square, signhunter, nes, bandits, simba  # noqa: F401, E402
from . import rays, signflip, hopskipjump, boundary, signopt, geoda  # noqa: F401, E402
from . import aaa_inverse  # noqa: F401, E402
from . import fgsm, pgd, mifgsm, cw, autoattack, eotpgd, npixel  # noqa: F401, E402
from . import transfer  # noqa: F401, E402

# isort: on
from .api import AttackResult, attack  # noqa: E402

ATTACKS: tuple[str, ...] = list_attacks()
"""Names accepted by :func:`make_attack` and ``sinai eval --attack``."""

__all__ = [
    "ATTACKS",
    "NORMS",
    "Attack",
    "AttackResult",
    "Oracle",
    "QueryRules",
    "ThreatModel",
    "attack",
    "attack_class",
    "distance",
    "is_attack",
    "list_attacks",
    "make_attack",
    "margin_loss",
    "project",
    "register_attack",
]
