"""What the decision-based (label-only) attacks share: labelled queries, batched binary searches, starts.

Every helper is batched over the images it is given: one oracle call per step for all of them, and an
image leaves a loop as soon as the oracle stops answering it (verified success inside the eps-ball, or
budget spent). All randomness comes from :class:`~sinai.attacks.streams.ImageStreams`, so an image's
trajectory does not depend on which other images are attacked with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from .base import Attack
from .oracle import Oracle
from .streams import ImageStreams

#: A family of candidates: (positions into the batch, parameter per position) -> images.
PointFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


def bisect(
    oracle: Oracle,
    idx: torch.Tensor,
    y: torch.Tensor,
    point: PointFn,
    lo: torch.Tensor,
    hi: torch.Tensor,
    tol: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Binary search of the boundary on ``point(pos, t)``: adversarial at ``hi``, not at ``lo``.

    All images at once, one query per image per step, until ``hi - lo <= tol``. Returns (lo, hi,
    answered): ``answered`` is False for images the oracle stopped answering during the search.
    """
    lo, hi = lo.clone(), hi.clone()
    tol = torch.as_tensor(tol, dtype=hi.dtype, device=hi.device).expand_as(hi)
    answered = torch.ones_like(hi, dtype=torch.bool)
    active = hi - lo > tol
    while bool(active.any()):
        pos = torch.nonzero(active).flatten()
        mid = (lo[pos] + hi[pos]) / 2
        ok, adv = ask(oracle, point(pos, mid), idx[pos], y)
        hi[pos[adv]] = mid[adv]
        lo[pos[ok & ~adv]] = mid[ok & ~adv]
        answered[pos[~ok]] = False
        active = answered & (hi - lo > tol)
    return lo, hi, answered


def on_ray(x: torch.Tensor, d: torch.Tensor) -> PointFn:
    """The candidates clip(x + r d) of a batch of rays, as ``bisect`` wants them."""
    return lambda pos, r: (x[pos] + view4(r) * d[pos]).clamp(0.0, 1.0)


def blend(x: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 - t) x + t target`` per image (t = 1: ``target``)."""
    return x + view4(t) * (target - x)


def box(x: torch.Tensor, target: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``target`` clipped to the linf box of radius ``r`` around ``x`` (the linf line search)."""
    return torch.minimum(torch.maximum(target, x - view4(r)), x + view4(r))


def random_start(
    oracle: Oracle,
    x: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    streams: ImageStreams,
    *,
    tries: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images until one is labelled adversarial (at most ``tries`` queries per image).

    Uniform noise (the papers' start), alternating with random binary images, which a model that
    labels all uniform noise alike may still see as another class.

    Returns (start, found) for the images ``idx``; ``start`` is ``x`` where nothing was found.
    """
    start = x[idx].clone()
    found = torch.zeros(len(idx), dtype=torch.bool, device=x.device)
    dead = torch.zeros_like(found)
    for attempt in range(tries):
        pos = torch.nonzero(~found & ~dead).flatten()
        if not len(pos):
            break
        noise = streams.uniform(idx[pos], tuple(x.shape[1:]))
        if attempt % 2:  # every other try a random binary image: some models label all grey noise alike
            noise = (noise < 0.5).float()
        ok, adv = ask(oracle, noise, idx[pos], y)
        start[pos[adv]] = noise[adv]
        found[pos[adv]] = True
        dead[pos[~ok]] = True
    return start, found
