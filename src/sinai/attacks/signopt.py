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

Each image runs this as its own state machine (start, binary search, sign probes, step search;
:mod:`sinai.attacks.phases`): one oracle call per step answers the next queries of all live images,
whatever their phases, and an image's queries are the same alone as in a batch.
"""

from __future__ import annotations

import torch

from .base import register_attack
from .decision import DecisionAttack, view4
from .oracle import Oracle
from .phases import Calls, PhaseRun, by_count, probe_chunk
from .streams import ImageStreams

START, SEARCH, PROBES, STEP, DONE = range(5)
"""An image's phase: start directions, binary search of g, sign probes, step-size search."""


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

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images, each in its own phase; return x + g(theta) theta (x where none)."""
        return _Run(self, oracle, x, y, seed).loop()


class _Run(PhaseRun):
    """One Sign-OPT run: per-image state, one oracle call per step for all live images."""

    SEARCH, DONE = SEARCH, DONE  # the codes PhaseRun needs

    def __init__(self, attack: SignOPT, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        self.a, self.oracle, self.x, self.y = attack, oracle, x, y
        self.streams = ImageStreams(x, seed)
        num, self.n, self.shape, dev = len(x), x[0].numel(), tuple(x.shape[1:]), x.device
        self.chunk = probe_chunk(self.n)
        self.phase = torch.full((num,), START, dtype=torch.long, device=dev)
        self.theta, self.g = torch.zeros_like(x), torch.full((num,), float("inf"), device=dev)
        self.alpha = torch.full((num,), attack.alpha, device=dev)
        # binary search of g along `ray` on [lo, hi]; `first`: the start's search (else a step's)
        self.ray = torch.zeros_like(x)
        self.lo, self.hi, self.tol = (torch.zeros(num, device=dev) for _ in range(3))
        self.first = torch.zeros(num, dtype=torch.bool, device=dev)
        self.grad, self.drawn = torch.zeros_like(x), torch.zeros(num, dtype=torch.long, device=dev)
        self.answered = torch.ones(num, dtype=torch.bool, device=dev)
        self.halvings = torch.zeros(num, dtype=torch.long, device=dev)
        self.asks = {
            START: self.ask_start,
            SEARCH: self.ask_search,
            PROBES: self.ask_probes,
            STEP: self.ask_step,
        }

    def loop(self) -> torch.Tensor:
        self.run_phases()
        # searches the oracle cut short still end at an adversarial hi
        self.end_search(torch.nonzero(self.phase == SEARCH).flatten(), finished=True)
        found = torch.isfinite(self.g)
        return (self.x + view4(torch.where(found, self.g, 0.0)) * self.theta).clamp(0.0, 1.0)

    # -- start: the first of `start_directions` random directions that is adversarial far out
    def ask_start(self, calls: Calls, idx: torch.Tensor) -> list:
        m, shape = self.a.start_directions, self.shape
        dirs = self.streams.normal(idx, (m, *shape))
        cand = (self.x.index_select(0, idx)[:, None] + dirs).clamp(0.0, 1.0)
        calls.add(cand.view(-1, *shape), idx.repeat_interleave(m))

        def answer(ok: torch.Tensor, adv: torch.Tensor) -> None:
            adv = adv.view(-1, m)
            has, first = adv.any(1), adv.float().argmax(1)
            self.phase[idx[~has]] = DONE
            pos = torch.nonzero(has).flatten()
            if not len(pos):
                return
            chosen = dirs[pos, first[pos]]
            hi = (cand[pos, first[pos]] - self.x[idx[pos]]).flatten(1).norm(dim=1) * 1.0001
            hi = torch.maximum(hi, chosen.flatten(1).norm(dim=1))  # beyond the clipped corner
            self.begin_search(idx[pos], unit(chosen), hi, first=True)

        return [answer]

    # -- binary search of g(ray) on [0, hi], to tol relative to hi
    def begin_search(self, idx: torch.Tensor, ray: torch.Tensor, hi: torch.Tensor, *, first: bool) -> None:
        if not len(idx):
            return
        self.ray[idx], self.lo[idx], self.hi[idx] = ray, 0.0, hi
        self.tol[idx], self.first[idx], self.phase[idx] = self.a.tol * hi, first, SEARCH

    def point(self, idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return (self.x.index_select(0, idx) + view4(r) * self.ray.index_select(0, idx)).clamp(0.0, 1.0)

    def end_search(self, idx: torch.Tensor, *, finished: bool = False) -> None:
        """g of the searched ray is hi: the start's sets theta; a step's replaces theta where nearer (and
        doubles alpha). Next: the sign probes of the next iteration."""
        if not len(idx):
            return
        first, g_new = self.first[idx], self.hi[idx]
        better = first | (g_new < self.g[idx])
        won = idx[better]
        self.theta[won], self.g[won] = self.ray.index_select(0, won), g_new[better]
        self.alpha[idx[~first]] *= 2
        self.phase[idx] = DONE if finished else PROBES
        self.drawn[idx], self.grad[idx], self.answered[idx] = 0, 0.0, True

    # -- sign estimate of the directional derivative: one query per random direction u_k
    def ask_probes(self, calls: Calls, idx: torch.Tensor) -> list:
        handlers, k, shape = [], self.a.k, self.shape
        for m, group in by_count(idx, (k - self.drawn[idx]).clamp(max=self.chunk)):
            # (in place where a fresh tensor allows it: the probes of a call can be large)
            u = self.streams.normal(group, (m, self.n)).view(len(group), m, *shape)
            probe = (self.a.beta * u).add_(self.theta.index_select(0, group)[:, None]).view(-1, *shape)
            probe.div_(view4(probe.flatten(1).norm(dim=1).clamp_min(1e-12)))  # unit()
            cand = view4(self.g[group])[:, None] * probe.view(len(group), m, *shape)
            cand.add_(self.x.index_select(0, group)[:, None]).clamp_(0.0, 1.0)
            calls.add(cand.view(-1, *shape), group.repeat_interleave(m))

            def answer(
                ok: torch.Tensor, adv: torch.Tensor, group: torch.Tensor = group, m: int = m, u=u
            ) -> None:
                signs = torch.where(adv.view(-1, m), -1.0, 1.0)
                self.grad[group] += u.mul_(signs.view(len(group), m, 1, 1, 1)).sum(1)  # (u: not needed after)
                self.answered[group] &= ok.view(-1, m).all(1)
                self.drawn[group] += m
                done = group[self.drawn[group] >= k]
                self.phase[done[~self.answered[done]]] = DONE  # the oracle stopped answering: finished
                done = done[self.answered[done]]
                self.grad[done] /= k
                self.halvings[done], self.phase[done] = 0, STEP

            handlers.append(answer)
        return handlers

    # -- step search: halve alpha until the fast check at g(theta) passes
    def ask_step(self, calls: Calls, idx: torch.Tensor) -> list:
        new = unit(self.theta.index_select(0, idx) - view4(self.alpha[idx]) * self.grad.index_select(0, idx))
        calls.add((self.x.index_select(0, idx) + view4(self.g[idx]) * new).clamp(0.0, 1.0), idx)

        def answer(ok: torch.Tensor, adv: torch.Tensor) -> None:
            self.begin_search(idx[adv], new[adv], self.g[idx[adv]], first=False)
            missed = idx[ok & ~adv]
            self.alpha[missed] /= 2
            self.halvings[missed] += 1
            stuck = missed[self.halvings[missed] > self.a.max_halvings]  # no step: start afresh
            self.alpha[stuck] = self.a.alpha
            self.phase[stuck], self.drawn[stuck], self.grad[stuck] = PROBES, 0, 0.0
            self.answered[stuck] = True

        return [answer]
