"""Inference-time noise defenses: one mechanism (noise at sites), many presets."""

from .hooks import Generators, SiteHook
from .protect import DefendedModel, protect, selected_count, site_counts, smallest_mask
from .sites import Site, classifier_head, describe_sites, find_sites
from .spec import (
    DEFAULT_SPECS,
    PRESETS,
    SITE_KINDS,
    Defense,
    NoiseSpec,
    list_defenses,
    parse_defense,
    preset,
    register_defense,
)

__all__ = [
    "DEFAULT_SPECS",
    "PRESETS",
    "SITE_KINDS",
    "DefendedModel",
    "Defense",
    "Generators",
    "NoiseSpec",
    "Site",
    "SiteHook",
    "classifier_head",
    "describe_sites",
    "find_sites",
    "list_defenses",
    "parse_defense",
    "preset",
    "protect",
    "register_defense",
    "selected_count",
    "site_counts",
    "smallest_mask",
]
