"""GeoDA: hard-label l2 attack from the geometry of the decision boundary near a boundary point.

Rahmati, Moosavi-Dezfooli, Frossard & Dai, "GeoDA: a geometric framework for black-box adversarial
attacks", CVPR 2020 (arXiv:2003.06468), untargeted l2. Start: a uniform-noise image labelled adversarial,
moved to the boundary point x_B by a binary search on the line to x. Iteration t: estimate the boundary
normal at x_B from N_t probes x_B + eta_i, eta_i ~ N(0, sigma^2 I): w = sum_i phi_i eta_i with
phi_i = +1 for an adversarial label, -1 otherwise (Algorithm 1, full input space); the minimal l2 step to
the linearized boundary is r_t = <x_B - x, w> w / ||w||^2; the attack moves out along r_t until the label
is adversarial (multiplying by ``grow``) and binary-searches back on the line to x for the next x_B, to
``tol`` x sigma sqrt(d) from the boundary so that the probes straddle it.

Queries are spread over the iterations as the paper's bound prescribes: N_t proportional to
lambda^(-2t/3) (``lam`` = 0.6, more probes later), with ``iterations`` chosen so that the first iteration
has at least ``min_samples`` probes given the budget left after the start (an estimate of ~15 binary
search queries per iteration is set aside). The allocation depends only on the oracle's budget, so an
image's run does not depend on the others.
"""

from __future__ import annotations

import torch

from .base import register_attack
from .decision import DecisionAttack, ask, bisect, blend, random_start, view4
from .oracle import Oracle
from .streams import ImageStreams

#: Queries set aside per iteration for the step-out and binary search.
SEARCH_QUERIES = 15


def allocation(total: int, lam: float, min_samples: int) -> list[int]:
    """Probes per iteration, N_t proportional to lam**(-2t/3), the most iterations with N_0 >= min_samples."""
    best = [max(total - SEARCH_QUERIES, min_samples)]
    for iters in range(2, 200):
        weights = [lam ** (-2 * t / 3) for t in range(iters)]
        left = total - iters * SEARCH_QUERIES
        counts = [int(left * w / sum(weights)) for w in weights]
        if left <= 0 or counts[0] < min_samples:
            break
        best = counts
    return best


@register_attack("geoda")
class GeoDA(DecisionAttack):
    """GeoDA (l2): boundary-normal estimates at x_B with the paper's growing query allocation."""

    norms = ("l2",)

    def __init__(
        self,
        *,
        sigma: float = 0.0002,
        lam: float = 0.6,
        min_samples: int = 20,
        grow: float = 1.5,
        max_grows: int = 10,
        start_tries: int = 100,
        tol: float = 0.1,
    ) -> None:
        if not (sigma > 0 and 0 < lam < 1 and min_samples >= 1 and grow > 1 and max_grows >= 0):
            raise ValueError("need sigma > 0, 0 < lam < 1, min_samples >= 1, grow > 1 and max_grows >= 0")
        if start_tries < 1 or not tol > 0:
            raise ValueError("start_tries must be >= 1 and tol > 0")
        self.sigma, self.lam, self.min_samples = float(sigma), float(lam), int(min_samples)
        self.grow, self.max_grows, self.start_tries, self.tol = (
            float(grow),
            int(max_grows),
            int(start_tries),
            float(tol),
        )

    def to_boundary(
        self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, outer: torch.Tensor
    ) -> torch.Tensor:
        """The boundary point on the line from x[idx] to the adversarial ``outer`` (binary search).

        It stops ``tol`` x sigma sqrt(d) from the boundary (in l2), well inside the probes' reach.
        """
        xi, one = x[idx], torch.ones(len(idx), device=x.device)
        length = (outer - xi).flatten(1).norm(dim=1).clamp_min(1e-12)
        tol = self.tol * self.sigma * xi[0].numel() ** 0.5 / length
        _, hi, _ = bisect(oracle, idx, y, lambda p, t: blend(xi[p], outer[p], t), 0 * one, one, tol)
        return blend(xi, outer, hi)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images together; return the best boundary point (x where none was found)."""
        streams = ImageStreams(x, seed)
        num, shape = len(x), tuple(x.shape[1:])
        x_b, best = x.clone(), x.clone()
        best_norm = torch.full((num,), float("inf"), device=x.device)
        has = torch.zeros(num, dtype=torch.bool, device=x.device)
        idx = oracle.live()
        start, found = random_start(oracle, x, y, idx, streams, tries=self.start_tries)
        if found.any():
            idx = idx[found]
            x_b[idx] = best[idx] = self.to_boundary(oracle, x, y, idx, start[found])
            best_norm[idx] = (x_b[idx] - x[idx]).flatten(1).norm(dim=1)
            has[idx] = True
        # The start costs a few tries and ~10 binary-search queries: plan with the rest of the budget.
        plan = allocation(oracle.budget // oracle.eot - 2 * SEARCH_QUERIES, self.lam, self.min_samples)
        t = 0
        while True:
            idx = oracle.live(among=has)
            if not len(idx):
                break
            samples = plan[min(t, len(plan) - 1)]
            t += 1
            xb, xi = x_b[idx], x[idx]
            eta = self.sigma * streams.normal(idx, (samples, *shape))
            cand = (xb[:, None] + eta).clamp(0.0, 1.0)
            ok, adv = ask(oracle, cand.view(-1, *shape), idx.repeat_interleave(samples), y)
            answered = ok.view(-1, samples).all(1)
            phi = torch.where(adv.view(-1, samples), 1.0, -1.0)
            w = (phi.view(-1, samples, 1, 1, 1) * eta).sum(1)
            idx, xb, xi, w = idx[answered], xb[answered], xi[answered], w[answered]
            if not len(idx):
                continue
            # The minimal l2 step from x onto the hyperplane through x_B with normal w.
            w_sq = w.flatten(1).pow(2).sum(1).clamp_min(1e-30)
            r = w * view4((w * (xb - xi)).flatten(1).sum(1) / w_sq)
            outer = xb.clone()
            scale = torch.ones(len(idx), device=x.device)
            pending = torch.ones(len(idx), dtype=torch.bool, device=x.device)
            for _ in range(self.max_grows + 1):
                pos = torch.nonzero(pending).flatten()
                if not len(pos):
                    break
                cand = (xi[pos] + view4(scale[pos]) * r[pos]).clamp(0.0, 1.0)
                ok, adv = ask(oracle, cand, idx[pos], y)
                outer[pos[adv]] = cand[adv]
                pending[pos[adv | ~ok]] = False
                scale[pos[ok & ~adv]] *= self.grow
            live = ~oracle.done[idx]
            idx, outer = idx[live], outer[live]
            if not len(idx):
                continue
            x_b[idx] = self.to_boundary(oracle, x, y, idx, outer)
            norms = (x_b[idx] - x[idx]).flatten(1).norm(dim=1)
            better = norms < best_norm[idx]
            best[idx[better]], best_norm[idx[better]] = x_b[idx[better]], norms[better]
        return best
