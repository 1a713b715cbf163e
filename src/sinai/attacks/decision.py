"""What the decision-based (label-only) attacks share: the base class, labelled queries, line points.

The attacks themselves run as per-image state machines (:mod:`sinai.attacks.phases`): one oracle call
per step for all live images, whatever their phases, with all randomness from
:class:`~sinai.attacks.streams.ImageStreams`, so an image's trajectory does not depend on which other
images are attacked with it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Attack
from .oracle import Oracle


def view4(t: torch.Tensor) -> torch.Tensor:
    """A per-image vector as (B, 1, 1, 1) for broadcasting against images."""
    return t.view(-1, 1, 1, 1)


class DecisionAttack(Attack):
    """Base of the label-only attacks: untargeted, through an oracle in ``output="labels"`` mode."""

    output: ClassVar[str] = "labels"


def ask(
    oracle: Oracle, cand: torch.Tensor, idx: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query ``cand`` for images ``idx`` (true labels ``y``, full vector): (answered, adversarial)."""
    labels = oracle(cand, idx)
    answered = labels != -1  # (the same test as >= 0 for labels, with the oracle's own comparison kernel)
    return answered, answered & (labels != y[idx])


def blend(x: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 - t) x + t target`` per image (t = 1: ``target``)."""
    return x + view4(t) * (target - x)


def box(x: torch.Tensor, target: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``target`` clipped to the linf box of radius ``r`` around ``x`` (the linf line search)."""
    return torch.minimum(torch.maximum(target, x - view4(r)), x + view4(r))
