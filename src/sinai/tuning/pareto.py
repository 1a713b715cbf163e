"""Pareto dominance with every objective maximized (clean and robust accuracy): the one definition."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` dominates ``b``: at least as good in every objective and better in one."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_mask(points: Sequence[Sequence[float]]) -> list[bool]:
    """For each point, whether no other point dominates it (equal points are all on the front)."""
    return [not any(dominates(q, p) for q in points) for p in points]


def pareto_front(items: Sequence[T], key: Callable[[T], Sequence[float]]) -> list[T]:
    """The items no other item dominates by ``key`` (their objectives), in their order."""
    mask = pareto_mask([key(item) for item in items])
    return [item for item, front in zip(items, mask, strict=True) if front]
