"""Inference-time noise defenses: one mechanism (noise at sites), many presets."""

from .protect import DefendedModel, protect, selected_count, site_counts, smallest_mask
from .sites import Site, applicable, classifier_head, describe_sites, find_sites
from .spec import (
    DEFAULT_SPECS,
    PRESETS,
    SITE_KINDS,
    Defense,
    NoiseSpec,
    parse_defense,
    preset,
)

__all__ = [
    "DEFAULT_SPECS",
    "PRESETS",
    "SITE_KINDS",
    "DefendedModel",
    "Defense",
    "NoiseSpec",
    "Site",
    "applicable",
    "classifier_head",
    "describe_sites",
    "find_sites",
    "parse_defense",
    "preset",
    "protect",
    "selected_count",
    "site_counts",
    "smallest_mask",
]
