"""Argument checks shared by the configuration objects (each checks its own fields once)."""

from __future__ import annotations


def check_count(name: str, value: object, minimum: int, what: str) -> int:
    """``value`` if it is an integer >= ``minimum`` (not a bool), else a ValueError saying what it counts."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({what}), got {value!r}")
    return value


def check_positive(name: str, value: object, *, integer: bool = False) -> float:
    """``value`` if it is a positive finite number (an int when ``integer``), else a ValueError."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    return value


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a ``TypeError`` (Python's convention) that is also a ``ValueError``
    (sinai's convention for bad input, which the command line prints as one line)."""
