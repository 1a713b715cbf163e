"""Query-based black-box attacks, one per file, all through the Oracle."""

from __future__ import annotations

import importlib

from .base import NORMS, Attack, margin_loss, perturbation_norm, project
from .oracle import Oracle

_REGISTRY: dict[str, tuple[str, str]] = {
    "square": ("square", "Square"),
    "signhunter": ("signhunter", "SignHunter"),
    "nes": ("nes", "NES"),
    "bandits": ("bandits", "Bandits"),
    "simba": ("simba", "SimBA"),
    "simba-dct": ("simba", "SimBADCT"),
    "rays": ("rays", "RayS"),
    "signflip": ("signflip", "SignFlip"),
    "hsja": ("hopskipjump", "HopSkipJump"),
    "boundary": ("boundary", "Boundary"),
    "signopt": ("signopt", "SignOPT"),
    "geoda": ("geoda", "GeoDA"),
}
ATTACKS: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`make_attack` and ``sinai eval --attack``."""


def attack_class(name: str) -> type[Attack]:
    """The class registered under ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)} (or 'none')")
    module, cls = _REGISTRY[key]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def make_attack(name: str, **kwargs: object) -> Attack:
    """Build the attack ``name`` with keyword hyper-parameters (``norm``, ``eps``, ``seed``, ...)."""
    return attack_class(name)(**kwargs)


__all__ = [
    "ATTACKS",
    "NORMS",
    "Attack",
    "Oracle",
    "attack_class",
    "make_attack",
    "margin_loss",
    "perturbation_norm",
    "project",
]
