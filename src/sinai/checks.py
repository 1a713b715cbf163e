"""Argument checks shared by the configuration objects (each checks its own fields once)."""

from __future__ import annotations


def check_count(name: str, value: object, minimum: int, what: str) -> int:
    """``value`` if it is an integer >= ``minimum`` (not a bool), else a ValueError saying what it counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({what}), got {value!r}")
    return value
