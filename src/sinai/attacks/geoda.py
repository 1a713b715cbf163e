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

Probes live in the low-frequency DCT subspace by default, as in the authors' experiments (Sec. 4: the
boundary's normal is estimated in a subspace of low frequencies, far fewer dimensions than the image):
eta = sigma D_H^T C D_W per channel, D the orthonormal DCT-II rows of the ``ceil(dct_ratio * H)`` (and W)
lowest frequencies and C standard normal; ``dct_ratio`` 1.0 is the full input space (then eta ~ N(0,
sigma^2 I) exactly, since D is orthonormal). The default ratio 1/3 follows the authors' code (a
75 x 75 basis for 224 x 224 images).

Each image runs this as its own state machine (start tries, line search, probes, step out;
:mod:`sinai.attacks.phases`): one oracle call per step answers the next queries of all live images,
whatever their phases, and an image's queries are the same alone as in a batch.
"""

from __future__ import annotations

import math

import torch

from .base import register_attack
from .decision import DecisionAttack, blend, view4
from .oracle import Oracle
from .phases import Calls, PhaseRun, by_count, probe_chunk
from .streams import ImageStreams

START, SEARCH, PROBES, GROW, DONE = range(5)
"""An image's phase: random start tries, line search to x_B, normal-estimate probes, step out along r_t."""

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
        dct_ratio: float = 1 / 3,
    ) -> None:
        if not (sigma > 0 and 0 < lam < 1 and min_samples >= 1 and grow > 1 and max_grows >= 0):
            raise ValueError("need sigma > 0, 0 < lam < 1, min_samples >= 1, grow > 1 and max_grows >= 0")
        if isinstance(dct_ratio, bool) or not isinstance(dct_ratio, (int, float)) or not 0 < dct_ratio <= 1:
            raise ValueError(
                f"dct_ratio must be in (0, 1] (the share of the lowest DCT frequencies per side the probes "
                f"use; 1 = the full input space), got {dct_ratio!r}"
            )
        self.dct_ratio = float(dct_ratio)
        if start_tries < 1 or not tol > 0:
            raise ValueError("start_tries must be >= 1 and tol > 0")
        self.sigma, self.lam, self.min_samples = float(sigma), float(lam), int(min_samples)
        self.grow, self.max_grows, self.start_tries, self.tol = (
            float(grow),
            int(max_grows),
            int(start_tries),
            float(tol),
        )

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images, each in its own phase; return the best boundary point (x where none)."""
        return _Run(self, oracle, x, y, seed).loop()


def dct_rows(n: int, k: int, *, device: torch.device | None = None) -> torch.Tensor:
    """The ``k`` lowest-frequency rows of the orthonormal DCT-II matrix of size ``n`` (k, n)."""
    f = torch.arange(k, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(n, dtype=torch.float64, device=device)[None, :]
    rows = torch.cos(math.pi * (2 * i + 1) * f / (2 * n)) * math.sqrt(2 / n)
    rows[0] /= math.sqrt(2)
    return rows.float()


class _Run(PhaseRun):
    """One GeoDA run: per-image state, one oracle call per step for all live images."""

    SEARCH, DONE = SEARCH, DONE  # the codes PhaseRun needs

    def __init__(self, attack: GeoDA, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        self.a, self.oracle, self.x, self.y = attack, oracle, x, y
        self.streams = ImageStreams(x, seed)
        num, self.shape, dev = len(x), tuple(x.shape[1:]), x.device
        self.d = x[0].numel()
        c, h, w = self.shape
        self.rows_h = dct_rows(h, math.ceil(attack.dct_ratio * h), device=dev)
        self.rows_w = dct_rows(w, math.ceil(attack.dct_ratio * w), device=dev)
        self.coeffs = (c, len(self.rows_h), len(self.rows_w))
        self.full = self.coeffs == (c, h, w)  # full space: plain Gaussian probes
        self.chunk = probe_chunk(self.d)
        # The start costs a few tries and ~10 binary-search queries: plan with the rest of the budget.
        self.plan = allocation(
            oracle.budget // oracle.eot - 2 * SEARCH_QUERIES, attack.lam, attack.min_samples
        )
        self.phase = torch.full((num,), START, dtype=torch.long, device=dev)
        self.tries = torch.zeros(num, dtype=torch.long, device=dev)
        self.x_b, self.best, self.outer = x.clone(), x.clone(), x.clone()
        self.best_norm = torch.full((num,), float("inf"), device=dev)
        self.lo, self.hi, self.tol = (torch.zeros(num, device=dev) for _ in range(3))
        self.iteration = torch.full((num,), -1, dtype=torch.long, device=dev)  # -1: before the first probes
        self.samples, self.drawn = (torch.zeros(num, dtype=torch.long, device=dev) for _ in range(2))
        self.w, self.r = torch.zeros_like(x), torch.zeros_like(x)
        self.answered = torch.ones(num, dtype=torch.bool, device=dev)
        self.scale = torch.ones(num, device=dev)
        self.grows = torch.zeros(num, dtype=torch.long, device=dev)
        self.asks = {
            START: self.ask_start,
            SEARCH: self.ask_search,
            PROBES: self.ask_probes,
            GROW: self.ask_grow,
        }

    def loop(self) -> torch.Tensor:
        self.run_phases()
        self.end_search(torch.nonzero(self.phase == SEARCH).flatten())  # cut short: hi is still adversarial
        return self.best

    # -- the line from x to `outer`, searched to tol x sigma sqrt(d) from the boundary (in l2)
    def begin_search(self, idx: torch.Tensor, outer: torch.Tensor) -> None:
        if not len(idx):
            return
        self.outer[idx], self.phase[idx], self.lo[idx], self.hi[idx] = outer, SEARCH, 0.0, 1.0
        length = (outer - self.x.index_select(0, idx)).flatten(1).norm(dim=1).clamp_min(1e-12)
        self.tol[idx] = self.a.tol * self.a.sigma * self.d**0.5 / length

    def point(self, idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return blend(self.x.index_select(0, idx), self.outer.index_select(0, idx), r)

    def end_search(self, idx: torch.Tensor) -> None:
        """x_B found: keep the best; next, the probes of the next iteration."""
        if not len(idx):
            return
        self.x_b[idx] = self.point(idx, self.hi[idx])
        norms = (self.x_b.index_select(0, idx) - self.x.index_select(0, idx)).flatten(1).norm(dim=1)
        better = norms < self.best_norm[idx]
        self.best[idx[better]], self.best_norm[idx[better]] = self.x_b[idx[better]], norms[better]
        self.iteration[idx] += 1
        it = self.iteration[idx].clamp(max=len(self.plan) - 1)
        self.samples[idx] = torch.tensor(self.plan, device=idx.device)[it]
        self.drawn[idx], self.w[idx], self.answered[idx], self.phase[idx] = 0, 0.0, True, PROBES

    # -- probes x_B + eta: w = sum phi_i eta_i (Algorithm 1), in the DCT subspace
    def probes(self, idx: torch.Tensor, m: int) -> torch.Tensor:
        """sigma-scaled probe directions (len(idx), m, C, H, W) from the images' streams."""
        if self.full:
            return self.a.sigma * self.streams.normal(idx, (m, *self.shape))
        coeffs = self.streams.normal(idx, (m, *self.coeffs))
        return self.a.sigma * (self.rows_h.T @ coeffs @ self.rows_w)

    def ask_probes(self, calls: Calls, idx: torch.Tensor) -> list:
        handlers = []
        for m, group in by_count(idx, (self.samples[idx] - self.drawn[idx]).clamp(max=self.chunk)):
            eta = self.probes(group, m)
            cand = (self.x_b.index_select(0, group)[:, None] + eta).clamp_(0.0, 1.0)
            calls.add(cand.view(-1, *self.shape), group.repeat_interleave(m))

            def answer(
                ok: torch.Tensor, adv: torch.Tensor, group: torch.Tensor = group, m: int = m, eta=eta
            ) -> None:
                phi = torch.where(adv.view(-1, m), 1.0, -1.0)
                # w += sum phi_i eta_i (in place in eta: not needed after)
                self.w.index_add_(0, group, eta.mul_(phi.view(-1, m, 1, 1, 1)).sum(1))
                self.answered[group] &= ok.view(-1, m).all(1)
                self.drawn[group] += m
                self.end_probes(group[self.drawn[group] >= self.samples[group]])

            handlers.append(answer)
        return handlers

    def end_probes(self, idx: torch.Tensor) -> None:
        """The minimal l2 step from x onto the hyperplane through x_B with normal w; then step out."""
        if not len(idx):
            return
        self.phase[idx[~self.answered[idx]]] = DONE  # the oracle stopped answering: finished
        idx = idx[self.answered[idx]]
        if not len(idx):
            return
        w = self.w.index_select(0, idx)
        w_sq = w.flatten(1).pow(2).sum(1).clamp_min(1e-30)
        self.r[idx] = w * view4(
            (w * (self.x_b.index_select(0, idx) - self.x.index_select(0, idx))).flatten(1).sum(1) / w_sq
        )
        self.scale[idx], self.grows[idx], self.phase[idx] = 1.0, 0, GROW

    # -- move out along r_t until adversarial (x grow each miss), then search back for the next x_B
    def ask_grow(self, calls: Calls, idx: torch.Tensor) -> list:
        cand = (self.x.index_select(0, idx) + view4(self.scale[idx]) * self.r.index_select(0, idx)).clamp(
            0.0, 1.0
        )
        calls.add(cand, idx)

        def answer(ok: torch.Tensor, adv: torch.Tensor) -> None:
            self.begin_search(idx[adv], cand[adv])
            missed = idx[ok & ~adv]
            self.scale[missed] *= self.a.grow
            self.grows[missed] += 1
            stuck = missed[self.grows[missed] > self.a.max_grows]  # search back from x_B itself
            self.begin_search(stuck, self.x_b.index_select(0, stuck))

        return [answer]
