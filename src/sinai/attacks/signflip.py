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

The attack stops when the oracle verifies an adversarial example inside the eps-ball. Randomness
(noise start, flip masks) comes from per-image streams, so an image's run does not depend on the
other images of the batch. If r is already <= eps (a success the vote did not confirm on a noisy
model), the projection aims at 0.9 r instead.
"""

from __future__ import annotations

import torch

from .base import register_attack
from .decision import DecisionAttack, ask, bisect, box, random_start, view4
from .oracle import Oracle
from .streams import ImageStreams


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

    @staticmethod
    def keep(
        delta: torch.Tensor, idx: torch.Tensor, cand: torch.Tensor, xi: torch.Tensor, adv: torch.Tensor
    ) -> None:
        """The candidates labelled adversarial become the perturbations of their images."""
        pos = torch.nonzero(adv).flatten()
        delta[idx[pos]] = cand.index_select(0, pos) - xi.index_select(0, pos)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images together; return the current adversarial point (x where none)."""
        eps = oracle.threat.eps
        streams = ImageStreams(x, seed)
        num, n = len(x), x[0].numel()
        shape = tuple(x.shape[1:])

        # Start: uniform noise, then the smallest linf box around x that keeps it adversarial.
        idx = oracle.live()
        delta = torch.zeros_like(x)
        has = torch.zeros(num, dtype=torch.bool, device=x.device)
        start, found = random_start(oracle, x, y, idx, streams, tries=self.start_tries)
        idx, start = idx[found], start[found]
        if len(idx):
            r0 = (start - x[idx]).flatten(1).abs().amax(1)
            _, hi, _ = bisect(
                oracle,
                idx,
                y,
                lambda p, r: box(x[idx[p]], start[p], r),
                torch.zeros_like(r0),
                r0,
                self.tol * r0,
            )
            delta[idx] = box(x[idx], start, hi) - x[idx]
            has[idx] = True

        eta = torch.full((num,), self.eta, device=x.device)
        p = torch.full((num,), max(self.p, 1.0 / n), device=x.device)
        flips = torch.zeros(num, dtype=torch.long, device=x.device)
        flip_wins = torch.zeros_like(flips)
        last, x_live = None, x
        while True:
            idx = oracle.live(among=has)
            if not len(idx):
                break
            if idx is not last:  # the oracle hands out the same live set until an image finishes
                last, x_live = idx, x.index_select(0, idx)
            # 1. projection towards eps
            xi, di = x_live, delta.index_select(0, idx)
            r = di.flatten(1).abs().amax(1)
            target = torch.where(r > eps, eps, 0.9 * r)
            eta_i = eta[idx]
            r_new = r - eta_i * (r - target)
            cand = (xi + di.clamp_(-view4(r_new), view4(r_new))).clamp_(0.0, 1.0)
            ok, adv = ask(oracle, cand, idx, y)
            self.keep(delta, idx, cand, xi, adv)
            # eta grows on success, shrinks on an answered failure (idx: distinct images)
            eta[idx] = torch.where(
                adv, (eta_i * self.grow).clamp(max=1.0), torch.where(ok, eta_i * self.shrink, eta_i)
            )
            if not bool(ok.all()):
                idx, xi = idx[ok], xi[ok]
                if not len(idx):
                    continue
            # 2. random sign flip
            di, p_i = delta.index_select(0, idx), p[idx]
            mask = streams.uniform(idx, shape) < view4(p_i)
            cand = (xi + torch.where(mask, -di, di)).clamp_(0.0, 1.0)
            ok, adv = ask(oracle, cand, idx, y)
            self.keep(delta, idx, cand, xi, adv)
            # flip statistics; every `window` flips p adapts to the success rate (idx: distinct images)
            count, wins = flips[idx] + ok, flip_wins[idx] + adv
            due = ok & (count % self.window == 0)
            rate = wins.float() / self.window
            up, down = due & (rate > 0.7), due & (rate < 0.3)
            p[idx] = torch.where(
                up, (p_i * 1.5).clamp(max=0.5), torch.where(down, (p_i / 1.5).clamp(min=1.0 / n), p_i)
            )
            flips[idx], flip_wins[idx] = count, torch.where(due, 0, wins)
        return x + delta
