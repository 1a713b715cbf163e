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
"""

from __future__ import annotations

import torch

from .base import register_attack
from .decision import DecisionAttack, ask, bisect, blend, random_start, view4
from .oracle import Oracle
from .streams import ImageStreams


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
        """Attack all live images together; return the current adversarial point (x where none)."""
        streams = ImageStreams(x, seed)
        num, shape = len(x), tuple(x.shape[1:])
        x_adv = x.clone()
        has = torch.zeros(num, dtype=torch.bool, device=x.device)
        idx = oracle.live()
        start, found = random_start(oracle, x, y, idx, streams, tries=self.start_tries)
        if found.any():
            idx, start = idx[found], start[found]
            one = torch.ones(len(idx), device=x.device)
            xi = x[idx]
            _, hi, _ = bisect(
                oracle, idx, y, lambda p, t: blend(xi[p], start[p], t), 0 * one, one, self.start_tol
            )
            x_adv[idx], has[idx] = blend(xi, start, hi), True

        spherical = torch.full((num,), self.spherical_step, device=x.device)
        source = torch.full((num,), self.source_step, device=x.device)
        steps = torch.zeros(num, dtype=torch.long, device=x.device)
        sph_wins, src_wins = torch.zeros_like(steps), torch.zeros_like(steps)
        while True:
            idx = oracle.live(among=has)
            if not len(idx):
                break
            xi, xa = x[idx], x_adv[idx]
            diff = xi - xa
            dist = diff.flatten(1).norm(dim=1).clamp_min(1e-12)
            unit = diff / view4(dist)
            eta = streams.normal(idx, shape)
            eta = eta * view4(spherical[idx] * dist / eta.flatten(1).norm(dim=1).clamp_min(1e-12))
            eta = eta - unit * view4((eta * unit).flatten(1).sum(1))  # orthogonal to x - x_adv
            moved = xa + eta - xi
            sph = xi + moved * view4(
                dist / moved.flatten(1).norm(dim=1).clamp_min(1e-12)
            )  # back on the sphere
            full = xi + (sph - xi) * view4(1 - source[idx])  # source step: distance times (1 - source)
            sph, full = sph.clamp(0.0, 1.0), full.clamp(0.0, 1.0)
            cand = torch.stack([sph, full], 1).view(-1, *shape)
            ok, adv = ask(oracle, cand, idx.repeat_interleave(2), y)
            ok, adv = ok.view(-1, 2), adv.view(-1, 2)
            answered = ok.all(1)
            keep = answered & adv[:, 1]
            x_adv[idx[keep]] = full[keep]
            idx, adv = idx[answered], adv[answered]
            steps[idx] += 1
            sph_wins[idx] += adv[:, 0].long()
            src_wins[idx] += adv[:, 1].long()
            due = steps[idx] % self.adapt_every == 0
            if due.any():
                for rate_wins, size in ((sph_wins, spherical), (src_wins, source)):
                    rate = rate_wins[idx].float() / self.adapt_every
                    up, down = due & (rate > 0.5), due & (rate < 0.2)
                    size[idx[up]] *= self.step_adaptation
                    size[idx[down]] /= self.step_adaptation
                    rate_wins[idx[due]] = 0
                source.clamp_(max=0.5)
        return x_adv
