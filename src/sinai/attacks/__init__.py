"""Query-based black-box attacks, one per file, all through the Oracle."""

from __future__ import annotations

from .base import Attack, attack_class, is_attack, list_attacks, make_attack, margin_loss, register_attack
from .oracle import Oracle, QueryRules
from .threat import NORMS, ThreatModel, distance, project

# Importing the attack modules registers their attacks: this order is the order of ATTACKS
# (score-based, then decision-based).
# isort: off
from . import square, signhunter, nes, bandits, simba  # noqa: F401, E402
from . import rays, signflip, hopskipjump, boundary, signopt, geoda  # noqa: F401, E402

# isort: on

ATTACKS: tuple[str, ...] = list_attacks()
"""Names accepted by :func:`make_attack` and ``sinai eval --attack``."""

__all__ = [
    "ATTACKS",
    "NORMS",
    "Attack",
    "Oracle",
    "QueryRules",
    "ThreatModel",
    "attack_class",
    "distance",
    "is_attack",
    "list_attacks",
    "make_attack",
    "margin_loss",
    "project",
    "register_attack",
]
