"""Sign Flip Attack: hard-label linf attack alternating a projection step and a random sign flip.

Chen, Zhang, Hu & Wu, "Boosting Decision-based Black-box Adversarial Attacks with Random Sign Flip",
ECCV 2020. The attack keeps an adversarial perturbation delta (starting from a uniform-noise image,
shrunk to the boundary by a binary search on the linf radius) and repeats two one-query steps:

1. *projection*: shrink the linf radius r = ||delta||_inf towards eps, r' = r - eta (r - eps), and
   clip delta into [-r', r']; kept if still adversarial. The fraction eta adapts: times ``grow`` on
   success, times ``shrink`` on failure (capped at 1).
2. *random sign flip*: flip the sign of each coordinate of delta with probability p; kept if still
   adversarial. Flipping moves delta to another vertex region of the same box, from where the next
   projection can succeed. p adapts to the flip success rate over the last ``window`` flips (above
   0.7: p x 1.5, below 0.3: p / 1.5, within [1/n, 0.5]).

The attack stops when the oracle verifies an adversarial example inside the eps-ball. If r is already
<= eps (a success the vote did not confirm on a noisy model), the projection aims at 0.9 r instead.

Each image runs this as its own state machine (start tries, binary search, projection, sign flip;
:mod:`sinai.attacks.phases`): one oracle call per step answers the next query of every live image,
whatever its phase. Randomness (noise start, flip masks) comes from per-image streams, so an image's
queries are the same alone as in a batch.
"""

from __future__ import annotations

import torch

from .base import register_attack
from .decision import DecisionAttack, box, view4
from .oracle import Oracle
from .phases import Calls, PhaseRun
from .streams import ImageStreams

START, SEARCH, PROJECT, FLIP, DONE = range(5)
"""An image's phase: random start tries, binary search of the start's radius, projection, sign flip."""


@register_attack("signflip")
class SignFlip(DecisionAttack):
    """Sign Flip Attack (linf): adaptive projection towards eps + random sign flips of delta."""

    norms = ("linf",)

    def __init__(
        self,
        *,
        eta: float = 0.5,
        p: float = 0.001,
        grow: float = 1.5,
        shrink: float = 0.5,
        window: int = 10,
        start_tries: int = 100,
        tol: float = 1e-3,
    ) -> None:
        if not (0 < eta <= 1 and 0 < p <= 0.5 and grow >= 1 and 0 < shrink < 1 and window >= 1):
            raise ValueError("need 0 < eta <= 1, 0 < p <= 0.5, grow >= 1, 0 < shrink < 1 and window >= 1")
        if start_tries < 1 or not tol > 0:
            raise ValueError("start_tries must be >= 1 and tol > 0")
        self.eta, self.p, self.grow, self.shrink = float(eta), float(p), float(grow), float(shrink)
        self.window, self.start_tries, self.tol = int(window), int(start_tries), float(tol)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images, each in its own phase; return the current adversarial point (x where
        none)."""
        return _Run(self, oracle, x, y, seed).loop()


class _Run(PhaseRun):
    """One Sign Flip run: per-image state, one oracle call per step for all live images."""

    SEARCH, DONE = SEARCH, DONE  # the codes PhaseRun needs

    def __init__(self, attack: SignFlip, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        self.a, self.oracle, self.x, self.y = attack, oracle, x, y
        self.streams = ImageStreams(x, seed)
        num, self.n, self.shape, dev = len(x), x[0].numel(), tuple(x.shape[1:]), x.device
        self.phase = torch.full((num,), START, dtype=torch.long, device=dev)
        self.tries = torch.zeros(num, dtype=torch.long, device=dev)
        self.start, self.delta = x.clone(), torch.zeros_like(x)
        self.lo, self.hi, self.tol = (torch.zeros(num, device=dev) for _ in range(3))
        self.eta = torch.full((num,), attack.eta, device=dev)
        self.p = torch.full((num,), max(attack.p, 1.0 / self.n), device=dev)
        self.flips, self.flip_wins = (torch.zeros(num, dtype=torch.long, device=dev) for _ in range(2))
        self.asks = {
            START: self.ask_start,
            SEARCH: self.ask_search,
            PROJECT: self.ask_project,
            FLIP: self.ask_flip,
        }

    def loop(self) -> torch.Tensor:
        self.run_phases()
        # searches the oracle cut short still end at an adversarial hi
        self.end_search(torch.nonzero(self.phase == SEARCH).flatten())
        return self.x + self.delta

    # -- start: uniform noise, then the smallest linf box around x that keeps it adversarial
    def begin_search(self, idx: torch.Tensor, start: torch.Tensor) -> None:
        if not len(idx):
            return
        r0 = (start - self.x.index_select(0, idx)).flatten(1).abs().amax(1)
        self.start[idx], self.phase[idx] = start, SEARCH
        self.lo[idx], self.hi[idx], self.tol[idx] = 0.0, r0, self.a.tol * r0

    def point(self, idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return box(self.x.index_select(0, idx), self.start.index_select(0, idx), r)

    def end_search(self, idx: torch.Tensor) -> None:
        if not len(idx):
            return
        self.delta[idx] = self.point(idx, self.hi[idx]) - self.x.index_select(0, idx)
        self.phase[idx] = PROJECT

    def keep(self, idx: torch.Tensor, cand: torch.Tensor, xi: torch.Tensor, adv: torch.Tensor) -> None:
        """The candidates labelled adversarial become the perturbations of their images."""
        pos = torch.nonzero(adv).flatten()
        new = cand.index_select(0, pos).sub_(xi.index_select(0, pos))
        self.delta.index_copy_(0, idx.index_select(0, pos), new)

    # -- 1. projection towards eps
    def ask_project(self, calls: Calls, idx: torch.Tensor) -> list:
        eps = self.oracle.threat.eps
        xi, di = self.x.index_select(0, idx), self.delta.index_select(0, idx)
        r = di.flatten(1).abs().amax(1)
        target = torch.where(r > eps, eps, 0.9 * r)
        eta = self.eta.index_select(0, idx)
        r_new = r - eta * (r - target)
        cand = (xi + di.clamp_(-view4(r_new), view4(r_new))).clamp_(0.0, 1.0)
        calls.add(cand, idx)

        def answer(ok: torch.Tensor, adv: torch.Tensor) -> None:
            self.keep(idx, cand, xi, adv)
            # eta grows on success, shrinks on an answered failure
            failed = torch.where(ok, eta * self.a.shrink, eta)
            self.eta.index_copy_(0, idx, torch.where(adv, (eta * self.a.grow).clamp(max=1.0), failed))
            self.phase.index_fill_(0, idx, FLIP)

        return [answer]

    # -- 2. random sign flip
    def ask_flip(self, calls: Calls, idx: torch.Tensor) -> list:
        a = self.a
        xi, di, p = self.x.index_select(0, idx), self.delta.index_select(0, idx), self.p.index_select(0, idx)
        flip = torch.where(self.streams.uniform(idx, self.shape) < view4(p), -1.0, 1.0)
        cand = torch.addcmul(xi, di, flip).clamp_(0.0, 1.0)  # x + (+-delta): the product is exact
        calls.add(cand, idx)

        def answer(ok: torch.Tensor, adv: torch.Tensor) -> None:
            self.keep(idx, cand, xi, adv)
            # flip statistics; every `window` flips p adapts to the success rate
            count, wins = self.flips.index_select(0, idx) + ok, self.flip_wins.index_select(0, idx) + adv
            due = ok & (count % a.window == 0)
            rate = wins.float() / a.window
            up, down = due & (rate > 0.7), due & (rate < 0.3)
            lowered = torch.where(down, (p / 1.5).clamp(min=1.0 / self.n), p)
            self.p.index_copy_(0, idx, torch.where(up, (p * 1.5).clamp(max=0.5), lowered))
            self.flips.index_copy_(0, idx, count)
            self.flip_wins.index_copy_(0, idx, torch.where(due, 0, wins))
            self.phase.index_fill_(0, idx, PROJECT)

        return [answer]
