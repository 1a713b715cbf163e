"""Boundary Attack: hard-label l2 random walk along the decision boundary towards the clean image.

Brendel, Rauber & Bethge, "Decision-Based Adversarial Attacks: Reliable Attacks Against Black-Box Machine
Learning Models", ICLR 2018 (arXiv:1712.04248), untargeted. Start: a uniform-noise image labelled
adversarial, moved towards x by a binary search on the line between them (the blended-noise start of the
reference implementation). Each step draws eta ~ N(0, I), rescales it to ``spherical_step`` times the
current distance d = ||x_adv - x||_2, removes its component along x - x_adv and projects the result back
onto the sphere of radius d around x (the orthogonal step), then moves ``source_step`` x d towards x (the
source step). Both candidates are queried (one oracle call, two queries per image); the step is kept
when the final candidate is adversarial. Every ``adapt_every`` steps each size is multiplied by
``step_adaptation`` when more than half of its recent candidates were adversarial and divided by it
when fewer than a fifth were (the paper's dynamic step-size adjustment).

Each image runs this as its own state machine (start tries, line search, walk; :mod:`sinai.attacks.phases`):
one oracle call per step answers the next queries of all live images, whatever their phases, and an
image's queries are the same alone as in a batch.
"""

from __future__ import annotations

import torch

from .base import register_attack
from .decision import DecisionAttack, blend, view4
from .oracle import Oracle
from .phases import Calls, PhaseRun
from .streams import ImageStreams

START, SEARCH, WALK, DONE = range(4)
"""An image's phase: random start tries, line search towards x, the walk along the boundary."""


@register_attack("boundary")
class Boundary(DecisionAttack):
    """Boundary Attack (l2): orthogonal + source steps with adaptive sizes."""

    norms = ("l2",)

    def __init__(
        self,
        *,
        spherical_step: float = 1e-2,
        source_step: float = 1e-2,
        step_adaptation: float = 1.5,
        adapt_every: int = 10,
        start_tries: int = 100,
        start_tol: float = 1e-3,
    ) -> None:
        if not (spherical_step > 0 and 0 < source_step < 1 and step_adaptation > 1 and adapt_every >= 1):
            raise ValueError(
                "need spherical_step > 0, 0 < source_step < 1, step_adaptation > 1, adapt_every >= 1"
            )
        if start_tries < 1 or not start_tol > 0:
            raise ValueError("start_tries must be >= 1 and start_tol > 0")
        self.spherical_step, self.source_step = float(spherical_step), float(source_step)
        self.step_adaptation, self.adapt_every = float(step_adaptation), int(adapt_every)
        self.start_tries, self.start_tol = int(start_tries), float(start_tol)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images, each in its own phase; return the current adversarial point (x where
        none)."""
        return _Run(self, oracle, x, y, seed).loop()


class _Run(PhaseRun):
    """One Boundary Attack run: per-image state, one oracle call per step for all live images."""

    SEARCH, DONE = SEARCH, DONE  # the codes PhaseRun needs

    def __init__(self, attack: Boundary, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        self.a, self.oracle, self.x, self.y = attack, oracle, x, y
        self.streams = ImageStreams(x, seed)
        num, self.shape, dev = len(x), tuple(x.shape[1:]), x.device
        self.phase = torch.full((num,), START, dtype=torch.long, device=dev)
        self.tries = torch.zeros(num, dtype=torch.long, device=dev)
        self.x_adv, self.start = x.clone(), x.clone()
        self.lo, self.hi = torch.zeros(num, device=dev), torch.ones(num, device=dev)
        self.tol = torch.full((num,), attack.start_tol, device=dev)
        self.spherical = torch.full((num,), attack.spherical_step, device=dev)
        self.source = torch.full((num,), attack.source_step, device=dev)
        self.steps = torch.zeros(num, dtype=torch.long, device=dev)
        self.sph_wins, self.src_wins = torch.zeros_like(self.steps), torch.zeros_like(self.steps)
        self.asks = {START: self.ask_start, SEARCH: self.ask_search, WALK: self.ask_walk}

    def loop(self) -> torch.Tensor:
        self.run_phases()
        searching = torch.nonzero(self.phase == SEARCH).flatten()  # cut short: hi is still adversarial
        self.x_adv[searching] = self.point(searching, self.hi[searching])
        return self.x_adv

    def begin_search(self, idx: torch.Tensor, start: torch.Tensor) -> None:
        self.start[idx], self.lo[idx], self.hi[idx], self.phase[idx] = start, 0.0, 1.0, SEARCH

    def point(self, idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The blended-noise start: binary search on the line from x to the adversarial noise."""
        return blend(self.x.index_select(0, idx), self.start.index_select(0, idx), r)

    def end_search(self, idx: torch.Tensor) -> None:
        if not len(idx):
            return
        self.x_adv[idx] = self.point(idx, self.hi[idx])
        self.phase[idx] = WALK

    def ask_walk(self, calls: Calls, idx: torch.Tensor) -> list:
        """One orthogonal step and one source step per image (two queries)."""
        a, shape = self.a, self.shape
        xi, xa = self.x.index_select(0, idx), self.x_adv.index_select(0, idx)
        # (in place where a fresh tensor allows it, in the same order of operations)
        diff = xi - xa
        dist = diff.flatten(1).norm(dim=1).clamp_min(1e-12)
        direction = diff.div_(view4(dist))
        eta = self.streams.normal(idx, shape)
        eta.mul_(view4(self.spherical[idx] * dist / eta.flatten(1).norm(dim=1).clamp_min(1e-12)))
        eta.sub_(direction * view4((eta * direction).flatten(1).sum(1)))  # orthogonal to x - x_adv
        moved = eta.add_(xa).sub_(xi)
        sph = moved.mul_(view4(dist / moved.flatten(1).norm(dim=1).clamp_min(1e-12))).add_(
            xi
        )  # on the sphere
        full = (sph - xi).mul_(view4(1 - self.source[idx])).add_(xi)  # source step: distance x (1 - source)
        pair = torch.empty((len(idx), 2, *shape), device=xi.device)  # [sph, full] of each image, clipped
        torch.clamp(sph, 0.0, 1.0, out=pair[:, 0])
        full = torch.clamp(full, 0.0, 1.0, out=pair[:, 1])
        calls.add(pair.view(-1, *shape), idx.repeat_interleave(2))

        def answer(ok: torch.Tensor, adv: torch.Tensor) -> None:
            ok, adv = ok.view(-1, 2), adv.view(-1, 2)
            answered = ok.all(1)
            keep = torch.nonzero(answered & adv[:, 1]).flatten()
            self.x_adv.index_copy_(0, idx.index_select(0, keep), full.index_select(0, keep))
            live, adv = idx[answered], adv[answered]
            self.steps[live] += 1
            self.sph_wins[live] += adv[:, 0].long()
            self.src_wins[live] += adv[:, 1].long()
            due = self.steps[live] % a.adapt_every == 0
            if due.any():
                for rate_wins, size in ((self.sph_wins, self.spherical), (self.src_wins, self.source)):
                    rate = rate_wins[live].float() / a.adapt_every
                    up, down = due & (rate > 0.5), due & (rate < 0.2)
                    size[live[up]] *= a.step_adaptation
                    size[live[down]] /= a.step_adaptation
                    rate_wins[live[due]] = 0
                self.source[live] = self.source[live].clamp(max=0.5)

        return [answer]
