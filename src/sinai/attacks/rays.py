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
"""

from __future__ import annotations

import math

import torch

from .decision import DecisionAttack, ask, bisect, live_indices, view4
from .oracle import Oracle


def on_ray(x: torch.Tensor, d: torch.Tensor):
    """The candidates clip(x + r d) of a batch of rays, as ``bisect`` wants them."""
    return lambda pos, r: (x[pos] + view4(r) * d[pos]).clamp(0.0, 1.0)


class RayS(DecisionAttack):
    """RayS (linf): hierarchical sign-block search of the ray with the nearest boundary."""

    name = "rays"
    norms = ("linf",)

    def __init__(self, *, norm: str = "linf", eps: float = 0.05, seed: int = 0, tol: float = 1e-3) -> None:
        super().__init__(norm=norm, eps=eps, seed=seed)
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        self.tol = float(tol)

    @torch.no_grad()
    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Attack all live images together; return the best adversarial point found (x where none)."""
        out_device = x.device
        x, y = self.setup(oracle, x, y)
        num, n = len(x), x[0].numel()
        tol = self.tol / math.sqrt(n)
        direction = torch.ones((num, n), device=x.device)  # d, as +-1
        radius = torch.full((num,), float("inf"), device=x.device)  # r* = g(d)
        coords = torch.arange(n, device=x.device)
        stage, block, first = 0, 0, True
        while True:
            idx = live_indices(oracle)
            if not len(idx):
                break
            trial = direction[idx].clone()
            if not first:  # flip block `block` of 2**stage blocks
                length = math.ceil(n / 2**stage)
                flip = (coords >= block * length) & (coords < (block + 1) * length)
                trial[:, flip] *= -1
                block += 1
                if block * length >= n:
                    stage, block = (stage + 1, 0) if length > 1 else (0, 0)
            first = False
            xi, di = x[idx], trial.view_as(x[idx])
            r_hi = radius[idx].clamp(max=1.0)
            _, adv = ask(oracle, (xi + view4(r_hi) * di).clamp(0.0, 1.0), idx, y)
            pos = torch.nonzero(adv).flatten()  # the fast check passed: search the boundary on d'
            if not len(pos):
                continue
            _, hi, _ = bisect(oracle, idx[pos], y, on_ray(xi[pos], di[pos]), 0 * r_hi[pos], r_hi[pos], tol)
            better = hi < radius[idx[pos]]  # hi is always labelled adversarial, even if cut short
            won = idx[pos[better]]
            radius[won], direction[won] = hi[better], trial[pos[better]]
        found = torch.isfinite(radius)
        x_adv = (x + view4(torch.where(found, radius, 0.0)) * direction.view_as(x)).clamp(0.0, 1.0)
        return x_adv.to(out_device)
