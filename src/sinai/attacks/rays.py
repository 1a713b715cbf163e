"""RayS: hard-label linf attack that searches the ray direction with the nearest decision boundary.

Chen & Gu, "RayS: A Ray Searching Method for Hard-label Adversarial Attack", KDD 2020
(arXiv:2006.12792). The attack minimizes g(d) = min {r : f(clip(x + r d)) != y} over sign directions
d in {-1, +1}^n (linf radius r, since ||d||_inf = 1). Starting from d = 1, stage s cuts the n
coordinates into 2**s blocks and tries to flip each block's sign in turn (Algorithm 1); a trial d'
first costs one *fast check*, a query at the current best radius r* (Algorithm 2): if clip(x + r* d')
is not adversarial, g(d') > r* and the trial is dropped without a search; otherwise a binary search on
[0, r*] finds g(d') and d' replaces d. When blocks reach one coordinate, the search restarts at s = 0.

The attack is deterministic (``seed`` is accepted for a uniform interface). Its binary search stops
at ``tol`` in the units of the paper's unit-l2 ray d / ||d||_2, i.e. tol / sqrt(n) in linf.

Each image runs this sequence on its own: at every step an image either makes its next fast check or
its next binary-search query, and one oracle call answers all live images, so the batch stays full
while a few images search (the sequence of queries of an image is the same as searching it alone).
"""

from __future__ import annotations

import math

import torch

from .base import register_attack
from .decision import DecisionAttack, ask, view4
from .oracle import Oracle


@register_attack("rays")
class RayS(DecisionAttack):
    """RayS (linf): hierarchical sign-block search of the ray with the nearest boundary."""

    norms = ("linf",)

    def __init__(self, *, tol: float = 1e-3) -> None:
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        self.tol = float(tol)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images together; return the best adversarial point found (x where none)."""
        num, n = len(x), x[0].numel()
        tol = self.tol / math.sqrt(n)
        direction = torch.ones((num, n), device=x.device)  # d, as +-1
        radius = torch.full((num,), float("inf"), device=x.device)  # r* = g(d)
        coords = torch.arange(n, device=x.device)
        # Per image: the block to flip next (stage s, block b of 2**s), the trial direction d', and
        # whether a binary search on [lo, hi] of d' is running (else the next step is a fast check).
        stage = torch.zeros(num, dtype=torch.long, device=x.device)
        block = torch.full((num,), -1, dtype=torch.long, device=x.device)  # -1: d itself comes first
        trial = direction.clone()
        searching = torch.zeros(num, dtype=torch.bool, device=x.device)
        lo, hi = torch.zeros(num, device=x.device), torch.zeros(num, device=x.device)
        last, xi = None, x
        while True:
            idx = oracle.live()
            if not len(idx):
                break
            if idx is not last:  # the oracle hands out the same live set until an image finishes
                last, xi = idx, x.index_select(0, idx)
            was_searching = searching.index_select(0, idx)
            check = idx[~was_searching]
            if len(check):
                self.next_trial(check, stage, block, direction, trial, coords, n)
                hi[check], lo[check] = radius[check].clamp(max=1.0), 0.0
            lo_i, hi_i = lo.index_select(0, idx), hi.index_select(0, idx)
            r = torch.where(was_searching, (lo_i + hi_i) / 2, hi_i)
            # every image live: the live set is 0..N-1 in order, no gather; x + r d' in one addcmul
            # (d' = +-1: the product r d' is exact, so the sums are those of x + (r * d'))
            d = trial if len(idx) == num else trial.index_select(0, idx)
            cand = torch.addcmul(xi, view4(r), d.view_as(xi)).clamp_(0.0, 1.0)
            ok, adv = ask(oracle, cand, idx, y)
            # a fast check that passed starts a search on [0, r*]; a search step halves its interval
            stepped = ok & was_searching
            hi_i = torch.where(stepped & adv, r, hi_i)
            lo_i = torch.where(stepped & ~adv, r, lo_i)
            now_searching = was_searching | (ok & adv)
            hi.index_copy_(0, idx, hi_i)
            lo.index_copy_(0, idx, lo_i)
            searching.index_copy_(0, idx, now_searching)
            narrow = now_searching & ok & (hi_i - lo_i <= tol)
            if bool(narrow.any()):
                self.settle(idx[narrow], searching, hi, radius, trial, direction)
        # searches the oracle cut short (success verified, budget spent) still found an adversarial hi
        self.settle(torch.nonzero(searching).flatten(), searching, hi, radius, trial, direction)
        found = torch.isfinite(radius)
        x_adv = (x + view4(torch.where(found, radius, 0.0)) * direction.view_as(x)).clamp(0.0, 1.0)
        return x_adv

    @staticmethod
    def settle(
        idx: torch.Tensor,
        searching: torch.Tensor,
        hi: torch.Tensor,
        radius: torch.Tensor,
        trial: torch.Tensor,
        direction: torch.Tensor,
    ) -> None:
        """End the searches of images ``idx``: d' replaces d where its boundary is nearer."""
        if not len(idx):
            return
        better = idx[hi[idx] < radius[idx]]  # hi is always labelled adversarial
        radius[better], direction[better] = hi[better], trial.index_select(0, better)
        searching[idx] = False

    @staticmethod
    def next_trial(
        idx: torch.Tensor,
        stage: torch.Tensor,
        block: torch.Tensor,
        direction: torch.Tensor,
        trial: torch.Tensor,
        coords: torch.Tensor,
        n: int,
    ) -> None:
        """d' = d with its next block flipped, for images ``idx`` (d itself the first time); advance."""
        s, b = stage.index_select(0, idx), block.index_select(0, idx)
        parts = 2**s
        length = (n + parts - 1) // parts  # ceil(n / 2**s)
        # block b = -1 (d itself) ends at 0: it flips nothing
        start = b * length
        flip = (coords >= start[:, None]) & (coords < (start + length)[:, None])
        d = direction.index_select(0, idx)
        trial.index_copy_(0, idx, torch.where(flip, -d, d))
        b = b + 1
        wrap = b * length >= n  # past the last block: halve the blocks, or restart at one block
        stage[idx] = torch.where(wrap, torch.where(length > 1, s + 1, 0), s)
        block[idx] = torch.where(wrap, 0, b)
