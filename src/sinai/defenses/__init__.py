"""Inference-time defenses: one mechanism (hooks at sites), many presets: noise (RND, FND, SINAI...) and
AAA's post-processing of the output logits."""

from .aaa import AAAHook, aaa_logits, check_logits, invert_linear_margin, margin_targets, undo_linear
from .hooks import Generators, SiteHook
from .protect import DefendedModel, protect, selected_count, site_counts, smallest_mask
from .sites import Site, classifier_head, describe_sites, find_sites
from .spec import (
    AAA_VARIANTS,
    DEFAULT_SPECS,
    NON_SMOOTH_KINDS,
    PRESETS,
    SITE_KINDS,
    AAASpec,
    Defense,
    NoiseSpec,
    list_defenses,
    parse_defense,
    preset,
    register_defense,
)

__all__ = [
    "AAA_VARIANTS",
    "DEFAULT_SPECS",
    "NON_SMOOTH_KINDS",
    "PRESETS",
    "SITE_KINDS",
    "AAAHook",
    "AAASpec",
    "DefendedModel",
    "Defense",
    "Generators",
    "NoiseSpec",
    "Site",
    "SiteHook",
    "aaa_logits",
    "check_logits",
    "classifier_head",
    "describe_sites",
    "find_sites",
    "invert_linear_margin",
    "list_defenses",
    "margin_targets",
    "parse_defense",
    "preset",
    "protect",
    "register_defense",
    "selected_count",
    "site_counts",
    "smallest_mask",
    "undo_linear",
]
