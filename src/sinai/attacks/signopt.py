"""Sign-OPT: hard-label l2 attack by sign-of-directional-derivative descent on the boundary distance.

Cheng, Singh, Chen, Chen, Liu & Hsieh, "Sign-OPT: A Query-Efficient Hard-label Adversarial Attack",
ICLR 2020 (arXiv:1909.10773), untargeted. With theta a unit direction, g(theta) = min {lambda :
f(clip(x + lambda theta)) != y} is the boundary distance along theta (found by a binary search). The
sign of the directional derivative of g along u costs a single query: clip(x + g(theta) (theta + beta
u) / ||theta + beta u||) adversarial means g decreases along u. The gradient estimate is
sum_k sign_k u_k over ``k`` Gaussian u_k (Algorithm 1), and theta moves by ``alpha`` times it; the step
is searched as in the paper's experiments: a candidate is accepted when its fast check at the current
g(theta) passes (then its g is found by a binary search), otherwise alpha is halved (up to
``max_halvings`` times per iteration), and alpha doubles after an accepted step.

Start (from the OPT attack): ``start_directions`` Gaussian directions queried at once; the first one
labelled adversarial is searched for its g. The binary searches stop at ``tol`` relative to g.
"""

from __future__ import annotations

import torch

from .base import register_attack
from .decision import DecisionAttack, ask, bisect, on_ray, view4
from .oracle import Oracle
from .streams import ImageStreams


def unit(t: torch.Tensor) -> torch.Tensor:
    """Each image-shaped row divided by its l2 norm."""
    return t / view4(t.flatten(1).norm(dim=1).clamp_min(1e-12))


@register_attack("signopt")
class SignOPT(DecisionAttack):
    """Sign-OPT (l2): single-query sign estimates of the directional derivative of g(theta)."""

    norms = ("l2",)

    def __init__(
        self,
        *,
        k: int = 200,
        alpha: float = 0.2,
        beta: float = 0.001,
        max_halvings: int = 15,
        start_directions: int = 100,
        tol: float = 1e-4,
    ) -> None:
        if k < 1 or not alpha > 0 or not beta > 0 or max_halvings < 0 or start_directions < 1 or not tol > 0:
            raise ValueError(
                "need k >= 1, alpha > 0, beta > 0, max_halvings >= 0, start_directions >= 1, tol > 0"
            )
        self.k, self.alpha, self.beta = int(k), float(alpha), float(beta)
        self.max_halvings, self.start_directions, self.tol = (
            int(max_halvings),
            int(start_directions),
            float(tol),
        )

    def search(
        self,
        oracle: Oracle,
        x: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        theta: torch.Tensor,
        hi: torch.Tensor,
    ) -> torch.Tensor:
        """g(theta) for directions labelled adversarial at distance ``hi`` (binary search on [0, hi])."""
        _, g, _ = bisect(oracle, idx, y, on_ray(x[idx], theta), torch.zeros_like(hi), hi, self.tol * hi)
        return g

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images together; return x + g(theta) theta (x where no start was found)."""
        streams = ImageStreams(x, seed)
        num, shape, n = len(x), tuple(x.shape[1:]), x[0].numel()
        theta = torch.zeros_like(x)
        g = torch.full((num,), float("inf"), device=x.device)

        # Start: the first of `start_directions` random directions that is adversarial far out.
        idx = oracle.live()
        m = self.start_directions
        dirs = streams.normal(idx, (m, *shape))
        cand = (x[idx][:, None] + dirs).clamp(0.0, 1.0)
        ok, adv = ask(oracle, cand.view(-1, *shape), idx.repeat_interleave(m), y)
        adv = adv.view(-1, m)
        has = adv.any(1)
        first = adv.float().argmax(1)
        if has.any():
            pos = torch.nonzero(has).flatten()
            t0 = unit(dirs[pos, first[pos]])
            hi = (cand[pos, first[pos]] - x[idx[pos]]).flatten(1).norm(dim=1) * 1.0001
            hi = torch.maximum(hi, dirs[pos, first[pos]].flatten(1).norm(dim=1))  # beyond the clipped corner
            theta[idx[pos]] = t0
            g[idx[pos]] = self.search(oracle, x, y, idx[pos], t0, hi)

        alpha = torch.full((num,), self.alpha, device=x.device)
        while True:
            idx = oracle.live(among=torch.isfinite(g))
            if not len(idx):
                break
            # Sign gradient estimate: one query per random direction u_k.
            th, gi = theta[idx], g[idx]
            u = streams.normal(idx, (self.k, n)).view(len(idx), self.k, *shape)
            probe = unit((th[:, None] + self.beta * u).reshape(-1, *shape)).view(len(idx), self.k, *shape)
            cand = (x[idx][:, None] + view4(gi)[:, None] * probe).clamp(0.0, 1.0)
            ok, adv = ask(oracle, cand.view(-1, *shape), idx.repeat_interleave(self.k), y)
            answered = ok.view(-1, self.k).all(1)
            signs = torch.where(adv.view(-1, self.k), -1.0, 1.0)
            grad = (signs.view(len(idx), self.k, 1, 1, 1) * u).sum(1) / self.k
            idx, th, gi, grad = idx[answered], th[answered], gi[answered], grad[answered]
            # Step search: halve alpha until the fast check at g(theta) passes.
            pending = torch.ones(len(idx), dtype=torch.bool, device=x.device)
            for _ in range(self.max_halvings + 1):
                pos = torch.nonzero(pending & ~oracle.done[idx]).flatten()
                if not len(pos):
                    break
                new = unit(th[pos] - view4(alpha[idx[pos]]) * grad[pos])
                ok, adv = ask(oracle, (x[idx[pos]] + view4(gi[pos]) * new).clamp(0.0, 1.0), idx[pos], y)
                won = pos[adv]
                if len(won):
                    g_new = self.search(oracle, x, y, idx[won], new[adv], gi[won])
                    better = g_new < g[idx[won]]
                    theta[idx[won[better]]], g[idx[won[better]]] = new[adv][better], g_new[better]
                    alpha[idx[won]] *= 2
                    pending[won] = False
                lost = pos[ok & ~adv]
                alpha[idx[lost]] /= 2
            alpha[idx[pending]] = self.alpha  # no step found: start the next search afresh
        found = torch.isfinite(g)
        x_adv = (x + view4(torch.where(found, g, 0.0)) * theta).clamp(0.0, 1.0)
        return x_adv
