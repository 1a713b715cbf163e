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

Each image runs this sequence as its own state machine (start tries, line search, probes, step search;
:mod:`sinai.attacks.phases`): at every step each live image makes its next query (or its next chunk of
probes), and one oracle call answers all of them, so the batch stays full while images are in different
phases; an image's queries are the same alone as in a batch.
"""

from __future__ import annotations

import math

import torch

from .base import register_attack
from .decision import DecisionAttack, blend, box, view4
from .oracle import Oracle
from .phases import Calls, PhaseRun, by_count, probe_chunk
from .streams import ImageStreams
from .threat import distance

START, SEARCH, ESTIMATE, STEP, DONE = range(5)
"""An image's phase: random start tries, line search to the boundary, gradient probes, step-size search."""


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

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images, each in its own phase; return the last boundary point (x where none)."""
        return _Run(self, oracle, x, y, seed).loop()


class _Run(PhaseRun):
    """One HopSkipJump run: per-image state, one oracle call per step for all live images."""

    SEARCH, DONE = SEARCH, DONE  # the codes PhaseRun needs

    def __init__(
        self, attack: HopSkipJump, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, seed: int
    ) -> None:
        self.a, self.oracle, self.x, self.y = attack, oracle, x, y
        self.streams = ImageStreams(x, seed)
        num, self.d, self.norm = len(x), x[0].numel(), oracle.threat.norm
        self.shape, dev = tuple(x.shape[1:]), x.device
        self.theta = attack.theta(self.d, self.norm)
        self.chunk = probe_chunk(self.d)
        self.phase = torch.full((num,), START, dtype=torch.long, device=dev)
        self.tries = torch.zeros(num, dtype=torch.long, device=dev)
        self.x_adv, self.outer = x.clone(), x.clone()
        self.lo, self.hi, self.tol = (torch.zeros(num, device=dev) for _ in range(3))
        self.t = torch.zeros(num, dtype=torch.long, device=dev)  # 1 after the first line search
        self.samples, self.drawn = (torch.zeros(num, dtype=torch.long, device=dev) for _ in range(2))
        self.sum_phi_u, self.sum_u = (
            torch.zeros(num, self.d, device=dev),
            torch.zeros(num, self.d, device=dev),
        )
        self.plus, self.delta, self.dist = (torch.zeros(num, device=dev) for _ in range(3))
        self.answered = torch.ones(num, dtype=torch.bool, device=dev)
        self.v, self.step = torch.zeros_like(x), torch.zeros(num, device=dev)
        self.halvings = torch.zeros(num, dtype=torch.long, device=dev)
        self.asks = {
            START: self.ask_start,
            SEARCH: self.ask_search,
            ESTIMATE: self.ask_probes,
            STEP: self.ask_step,
        }

    def loop(self) -> torch.Tensor:
        self.run_phases()
        # line searches the oracle cut short still end at an adversarial hi
        searching = torch.nonzero(self.phase == SEARCH).flatten()
        self.x_adv[searching] = self.point(searching, self.hi[searching])
        return self.x_adv

    # -- line search between x (clean) and `outer` (adversarial): on the line (l2) or the linf radius
    def point(self, idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        fn = blend if self.norm == "l2" else box
        return fn(self.x.index_select(0, idx), self.outer.index_select(0, idx), r)

    def begin_search(self, idx: torch.Tensor, outer: torch.Tensor) -> None:
        if not len(idx):
            return
        self.outer[idx], self.phase[idx] = outer, SEARCH
        self.lo[idx] = 0.0
        if self.norm == "l2":
            self.hi[idx], self.tol[idx] = 1.0, self.theta
        else:
            r0 = distance(outer, self.x.index_select(0, idx), "linf")
            self.hi[idx], self.tol[idx] = r0, self.theta * r0

    def end_search(self, idx: torch.Tensor) -> None:
        """The boundary point is found: next, the probes of iteration t (or done after max_iter)."""
        if not len(idx):
            return
        self.x_adv[idx] = self.point(idx, self.hi[idx])
        self.t[idx] += 1
        if self.a.max_iter is not None:
            over = self.t[idx] > self.a.max_iter
            self.phase[idx[over]] = DONE
            idx = idx[~over]
        t = self.t[idx].double()
        self.samples[idx] = (self.a.init_samples * t.sqrt()).long().clamp(max=self.a.max_samples)
        self.drawn[idx], self.plus[idx], self.answered[idx] = 0, 0.0, True
        self.sum_phi_u[idx], self.sum_u[idx] = 0.0, 0.0
        self.dist[idx] = self.oracle.threat.distance(
            self.x_adv.index_select(0, idx), self.x.index_select(0, idx)
        )
        scale = math.sqrt(self.d) * self.theta if self.norm == "l2" else self.d * self.theta
        self.delta[idx] = scale * self.dist[idx]
        self.phase[idx] = ESTIMATE

    # -- gradient-direction probes (eq. 16), in chunks of at most `probe_chunk` per image and call
    def ask_probes(self, calls: Calls, idx: torch.Tensor) -> list:
        handlers = []
        left = (self.samples[idx] - self.drawn[idx]).clamp(max=self.chunk)
        for m, group in by_count(idx, left):
            # (in place where a fresh tensor allows it: the probes of a call can be large)
            u = self.streams.normal(group, (m, self.d))
            u.div_(u.norm(dim=2, keepdim=True).clamp_min(1e-12))
            cand = view4(self.delta[group])[:, None] * u.view(len(group), m, *self.shape)
            cand.add_(self.x_adv.index_select(0, group)[:, None]).clamp_(0.0, 1.0)
            calls.add(cand.view(-1, *self.shape), group.repeat_interleave(m))

            def answer(
                ok: torch.Tensor, adv: torch.Tensor, group: torch.Tensor = group, m: int = m, u=u
            ) -> None:
                phi = adv.view(len(group), m).float() * 2 - 1
                self.answered[group] &= ok.view(len(group), m).all(1)
                self.sum_u[group] += u.sum(1)
                self.sum_phi_u[group] += u.mul_(phi[..., None]).sum(1)  # u is not needed after this
                self.plus[group] += phi.sum(1)
                self.drawn[group] += m
                self.end_probes(group[self.drawn[group] >= self.samples[group]])

            handlers.append(answer)
        return handlers

    def end_probes(self, idx: torch.Tensor) -> None:
        """The baseline-corrected estimate sum (phi - b) u = sum phi u - b sum u; then the step search."""
        if not len(idx):
            return
        self.phase[idx[~self.answered[idx]]] = DONE  # the oracle stopped answering: finished
        idx = idx[self.answered[idx]]
        mean = self.plus[idx] / self.samples[idx]
        baseline = torch.where(mean.abs() < 1, mean, torch.zeros_like(mean))  # plain if all agree
        total = (
            self.sum_phi_u.index_select(0, idx) - baseline[:, None] * self.sum_u.index_select(0, idx)
        ).view(len(idx), *self.shape)
        if self.norm == "l2":
            self.v[idx] = total / total.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        else:
            self.v[idx] = total.sign()
        self.step[idx] = self.dist[idx] / self.t[idx].float().sqrt()
        self.halvings[idx], self.phase[idx] = 0, STEP

    # -- geometric step-size search: halve xi until x_t + xi v is adversarial
    def ask_step(self, calls: Calls, idx: torch.Tensor) -> list:
        cand = (self.x_adv.index_select(0, idx) + view4(self.step[idx]) * self.v.index_select(0, idx)).clamp(
            0.0, 1.0
        )
        calls.add(cand, idx)

        def answer(ok: torch.Tensor, adv: torch.Tensor) -> None:
            self.begin_search(idx[adv], cand[adv])
            missed = idx[ok & ~adv]
            self.step[missed] /= 2
            self.halvings[missed] += 1
            stuck = missed[self.halvings[missed] >= self.a.max_halvings]  # search back from x_t itself
            self.begin_search(stuck, self.x_adv.index_select(0, stuck))

        return [answer]
