"""HopSkipJumpAttack (HSJA): hard-label attack by gradient-direction estimates at the boundary (l2, linf).

Chen, Jordan & Wainwright, "HopSkipJumpAttack: A Query-Efficient Decision-Based Attack", IEEE S&P 2020
(arXiv:1904.02144), untargeted, Algorithm 2 with the paper's defaults:

- start: a uniform-noise image labelled adversarial, moved to the boundary by a binary search on the
  line to x (threshold theta);
- iteration t: at the boundary point x_t, estimate the gradient direction from n_t = B0 sqrt(t)
  (at most ``max_samples``) probes x_t + delta_t u_b, u_b uniform on the unit sphere, with the
  baseline-corrected Monte-Carlo estimate (eq. 16); delta_t = sqrt(d) theta ||x_t - x||_2 (l2) or
  d theta ||x_t - x||_inf (linf); the update direction is the normalized estimate (l2) or its sign
  (linf);
- geometric step-size search: xi_t = ||x_t - x|| / sqrt(t), halved until x_t + xi_t v is adversarial;
- binary search back to the boundary between x and that point: on the line (l2) or on the radius of
  the linf box around x (linf), to threshold theta = d^(-3/2) (l2) or d^(-2) (linf) (for linf,
  relative to the starting radius).

All images advance together (one oracle call per step for the whole live set; the gradient probes
of every image go in one call, chunked to bound memory), with per-image random streams.
"""

from __future__ import annotations

import math

import torch

from .base import register_attack
from .decision import DecisionAttack, ask, bisect, blend, box, random_start, view4
from .oracle import Oracle
from .streams import ImageStreams
from .threat import distance

#: Largest number of probe elements (images x samples x pixels) built at once.
CHUNK_ELEMENTS = 1 << 24


@register_attack("hsja")
class HopSkipJump(DecisionAttack):
    """HopSkipJumpAttack (l2, linf), untargeted; ``gamma`` sets theta, ``init_samples`` is B0.

    ``max_iter``: stop after that many iterations (None: run until the oracle's budget is spent).
    """

    norms = ("l2", "linf")

    def __init__(
        self,
        *,
        gamma: float = 1.0,
        init_samples: int = 100,
        max_samples: int = 10_000,
        max_halvings: int = 25,
        start_tries: int = 100,
        max_iter: int | None = None,
    ) -> None:
        if max_iter is not None and max_iter < 0:
            raise ValueError(f"max_iter must be >= 0 or None (until the budget is spent), got {max_iter!r}")
        self.max_iter = max_iter
        if not gamma > 0 or init_samples < 1 or max_samples < init_samples:
            raise ValueError("need gamma > 0, init_samples >= 1 and max_samples >= init_samples")
        if max_halvings < 1 or start_tries < 1:
            raise ValueError("max_halvings and start_tries must be >= 1")
        self.gamma, self.init_samples, self.max_samples = float(gamma), int(init_samples), int(max_samples)
        self.max_halvings, self.start_tries = int(max_halvings), int(start_tries)

    def theta(self, d: int, norm: str) -> float:
        """Binary-search threshold: gamma d^(-3/2) for l2, gamma d^(-2) for linf."""
        return self.gamma / (d * math.sqrt(d)) if norm == "l2" else self.gamma / d**2

    def to_boundary(
        self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, outer: torch.Tensor
    ) -> torch.Tensor:
        """Binary search between x[idx] (clean side) and the adversarial ``outer``: the boundary point."""
        xi, d, norm = x[idx], x[0].numel(), oracle.threat.norm
        if norm == "l2":
            one = torch.ones(len(idx), device=x.device)
            _, hi, _ = bisect(
                oracle, idx, y, lambda p, t: blend(xi[p], outer[p], t), 0 * one, one, self.theta(d, norm)
            )
            return blend(xi, outer, hi)
        r0 = distance(outer, xi, "linf")
        _, hi, _ = bisect(
            oracle,
            idx,
            y,
            lambda p, r: box(xi[p], outer[p], r),
            torch.zeros_like(r0),
            r0,
            self.theta(d, norm) * r0,
        )
        return box(xi, outer, hi)

    def estimate_direction(
        self,
        oracle: Oracle,
        x_b: torch.Tensor,
        y: torch.Tensor,
        idx: torch.Tensor,
        delta: torch.Tensor,
        samples: int,
        streams: ImageStreams,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Baseline-corrected Monte-Carlo direction at the boundary points ``x_b``: (v, answered)."""
        shape, d = tuple(x_b.shape[1:]), x_b[0].numel()
        total = torch.zeros_like(x_b)
        plus = torch.zeros(len(idx), device=x_b.device)
        answered = torch.ones(len(idx), dtype=torch.bool, device=x_b.device)
        chunk = max(1, CHUNK_ELEMENTS // max(1, len(idx) * d))
        probes_u, probes_phi = [], []
        for start in range(0, samples, chunk):
            m = min(chunk, samples - start)
            u = streams.normal(idx, (m, d))
            u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)
            cand = (x_b[:, None] + view4(delta)[:, None] * u.view(len(idx), m, *shape)).clamp(0.0, 1.0)
            ok, adv = ask(oracle, cand.view(-1, *shape), idx.repeat_interleave(m), y)
            answered &= ok.view(len(idx), m).all(1)
            phi = adv.view(len(idx), m).float() * 2 - 1
            plus += phi.sum(1)
            probes_u.append(u)
            probes_phi.append(phi)
        mean = plus / samples
        baseline = torch.where(mean.abs() < 1, mean, torch.zeros_like(mean))  # eq. 16 (plain if all agree)
        for u, phi in zip(probes_u, probes_phi, strict=True):
            total += ((phi - baseline[:, None])[..., None] * u).sum(1).view_as(x_b)
        if oracle.threat.norm == "l2":
            return total / total.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1), answered
        return total.sign(), answered

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images together; return the last boundary point (x where none was found)."""
        streams = ImageStreams(x, seed)
        num, d, norm = len(x), x[0].numel(), oracle.threat.norm
        theta = self.theta(d, norm)
        x_adv = x.clone()
        has = torch.zeros(num, dtype=torch.bool, device=x.device)
        idx = oracle.live()
        start, found = random_start(oracle, x, y, idx, streams, tries=self.start_tries)
        if found.any():
            idx = idx[found]
            x_adv[idx] = self.to_boundary(oracle, x, y, idx, start[found])
            has[idx] = True
        t = torch.ones(num, dtype=torch.long, device=x.device)  # iteration per image
        while True:
            idx = oracle.live(among=has)
            if self.max_iter is not None:
                idx = idx[t[idx] <= self.max_iter]
            if not len(idx):
                break
            xb, xi = x_adv[idx], x[idx]
            dist = oracle.threat.distance(xb, xi)
            scale = math.sqrt(d) * theta if norm == "l2" else d * theta
            delta = scale * dist
            ti = int(t[idx].max())  # all images start together, so t is shared; max() for safety
            samples = min(int(self.init_samples * math.sqrt(ti)), self.max_samples)
            v, ok = self.estimate_direction(oracle, xb, y, idx, delta, samples, streams)
            idx, xb, xi, v, dist = idx[ok], xb[ok], xi[ok], v[ok], dist[ok]
            if not len(idx):
                continue
            # Geometric step-size search: halve xi until x_t + xi v is adversarial.
            xi_step = dist / torch.sqrt(t[idx].float())
            outer = xb.clone()
            pending = torch.ones(len(idx), dtype=torch.bool, device=x.device)
            for _ in range(self.max_halvings):
                pos = torch.nonzero(pending).flatten()
                if not len(pos):
                    break
                cand = (xb[pos] + view4(xi_step[pos]) * v[pos]).clamp(0.0, 1.0)
                answered, adv = ask(oracle, cand, idx[pos], y)
                outer[pos[adv]] = cand[adv]
                pending[pos[adv | ~answered]] = False
                xi_step[pos[answered & ~adv]] /= 2
            live = ~oracle.done[idx]
            idx, outer, xi = idx[live], outer[live], xi[live]
            if len(idx):
                x_adv[idx] = self.to_boundary(oracle, x, y, idx, outer)
            t[idx] += 1
        return x_adv
