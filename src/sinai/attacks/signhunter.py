"""SignHunter: score-based attack that searches the sign of the perturbation by flipping chunks.

Al-Dujaili & O'Reilly, "Sign Bits Are All You Need for Black-Box Attacks", ICLR 2020 (arXiv:1902.06894).
The candidate for a sign vector s in {-1, +1}^n is the projection of x_o + delta * s onto the eps-ball
around x and [0, 1], with delta = eps for linf and eps / sqrt(n) for l2 (so that ||delta * s||_2 = eps).
Starting from s = 1, level h splits the n coordinates into chunks of ceil(n / 2**h) and flips them one at a
time, one query each, keeping a flip when the loss does not get worse (the paper keeps f(s) >= f_best for
a loss it maximizes; here the margin loss is minimized). After the last level (chunks of one coordinate)
the search restarts as in the paper: x_o becomes the current adversarial point, s = 1 again and h = 0.

The search is deterministic: the run's ``seed`` is accepted for a uniform interface but nothing is drawn.
"""

from __future__ import annotations

import math

import torch

from .base import Attack, margin_loss, register_attack
from .oracle import Oracle
from .threat import ThreatModel


@register_attack("signhunter")
class SignHunter(Attack):
    """SignHunter (linf, l2): hierarchical sign flipping of x_o + delta * s, untargeted margin loss."""

    norms = ("linf", "l2")

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images together, one oracle call per iteration; return the final x_adv."""
        threat = oracle.threat
        num, n = len(x), x[0].numel()
        step = threat.eps if threat.norm == "linf" else threat.eps / math.sqrt(n)
        last_level = math.ceil(math.log2(n)) if n > 1 else 0
        coords = torch.arange(n, device=x.device)

        # Per-image search state: origin x_o, flipped coordinates of s (True = -1), best loss, level h,
        # chunk i, and whether the next query is the setup query f(1) of a (re)started search.
        origin = x.clone()
        negative = torch.zeros((num, n), dtype=torch.bool, device=x.device)
        loss = torch.full((num,), float("inf"), device=x.device)
        level = torch.zeros(num, dtype=torch.long, device=x.device)
        chunk = torch.zeros(num, dtype=torch.long, device=x.device)
        fresh = torch.ones(num, dtype=torch.bool, device=x.device)
        x_adv = x.clone()
        # Every live image answers every query, so all follow one schedule (h, i, setup query or not): it
        # is kept as plain ints, and only the chunk being flipped is computed, until an answer is missing
        # (NaN logits); from then on each image has its own schedule in the tensors above.
        shared: tuple[int, int, bool] | None = (0, 0, True)
        last, xi, yi = None, x, y
        while True:
            idx = oracle.live()
            if not len(idx):
                break
            every = len(idx) == num  # all images live (the common case): no gathers
            if idx is not last:  # the oracle hands out the same live set until an image finishes
                last = idx
                xi, yi = (x, y) if every else (x.index_select(0, idx), y[idx])
            oi, ni = (
                (origin, negative) if every else (origin.index_select(0, idx), negative.index_select(0, idx))
            )
            if shared is not None:
                h_s, i_s, new_s = shared
                length = (n + 2**h_s - 1) // 2**h_s  # ceil(n / 2**h)
                start, end_s = i_s * length, min((i_s + 1) * length, n)
                cand, neg = self._shared_candidate(
                    threat, xi, oi, ni, x_adv, idx, every, step, start, end_s, new_s
                )
            else:
                h, i, new = level[idx], chunk[idx], fresh[idx]
                parts = 2**h
                length = (n + parts - 1) // parts  # ceil(n / 2**h)
                start, end = i * length, torch.clamp((i + 1) * length, max=n)
                flip = (coords >= start[:, None]) & (coords < end[:, None])
                neg = (ni ^ flip) & ~new[:, None]  # a fresh search starts from s = 1 (and flips nothing)
                s = 1.0 - 2.0 * neg.float()
                cand = threat.project(oi + step * s.view_as(xi), xi)
            logits = oracle(cand, idx)
            if shared is not None and bool(torch.isnan(logits).any()):  # each image on its own from here
                level.fill_(h_s), chunk.fill_(i_s), fresh.fill_(new_s)
                h, i, new = level[idx], chunk[idx], fresh[idx]
                parts, end = 2**h, torch.full_like(idx, end_s)
                shared = None
            if shared is not None:
                new_loss = margin_loss(logits, yi)
                keep = torch.nonzero(new_loss <= (loss if every else loss[idx])).flatten()
                self._keep_shared(
                    negative,
                    x_adv,
                    loss,
                    idx,
                    keep,
                    neg,
                    cand,
                    new_loss,
                    start,
                    end_s,
                    new_s,
                    threat.norm == "linf",
                )
                # Next chunk; next level after the last chunk; restart after the last level.
                if not new_s:
                    i_s += 1
                    if i_s == 2**h_s or end_s == n:
                        h_s, i_s = h_s + 1, 0
                restart = h_s == last_level + 1
                if restart:
                    origin[idx] = x_adv if every else x_adv.index_select(0, idx)
                shared = (0 if restart else h_s, i_s, restart)
                continue
            ok = ~torch.isnan(logits).any(1)
            y_ok = yi
            if not bool(ok.all()):
                idx, cand, neg, new, h, i, end = idx[ok], cand[ok], neg[ok], new[ok], h[ok], i[ok], end[ok]
                logits, parts, y_ok = logits[ok], parts[ok], yi[ok]
            new_loss = margin_loss(logits, y_ok)

            keep = new | (new_loss <= loss[idx])  # the setup query defines f_best unconditionally
            pos = torch.nonzero(keep).flatten()
            kept = idx[pos]
            negative[kept], x_adv[kept] = neg.index_select(0, pos), cand.index_select(0, pos)
            loss[kept] = new_loss[pos]

            # Next chunk; next level after the last chunk; restart after the last level.
            i = torch.where(new, i, i + 1)
            level_done = ~new & ((i == parts) | (end == n))
            h, i = torch.where(level_done, h + 1, h), torch.where(level_done, 0, i)
            restart = h == last_level + 1
            origin[idx[restart]] = x_adv[idx[restart]]
            level[idx], chunk[idx] = torch.where(restart, 0, h), i
            fresh[idx] = restart
        return x_adv

    @staticmethod
    def _shared_candidate(
        threat: ThreatModel,
        xi: torch.Tensor,
        oi: torch.Tensor,
        ni: torch.Tensor,
        x_adv: torch.Tensor,
        idx: torch.Tensor,
        every: bool,
        step: float,
        start: int,
        end: int,
        new: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates and their sign masks when every image flips chunk [start, end) (or, ``new``, makes
        its setup query s = 1). linf projects pixel by pixel, and each image's x_adv is its origin moved by
        its sign vector, projected: the candidate is x_adv with the chunk recomputed."""
        if new:
            return threat.project(oi + step, xi), torch.zeros_like(ni)
        neg = ni.clone()
        neg[:, start:end] = ~ni[:, start:end]
        b = len(ni)
        if threat.norm != "linf":
            return threat.project(oi + step * (1.0 - 2.0 * neg.float()).view_as(xi), xi), neg
        cand = (x_adv if every else x_adv.index_select(0, idx)).clone()
        s = 1.0 - 2.0 * neg[:, start:end].float()
        chunk = threat.project(oi.view(b, -1)[:, start:end] + step * s, xi.view(b, -1)[:, start:end])
        cand.view(b, -1)[:, start:end] = chunk
        return cand, neg

    @staticmethod
    def _keep_shared(
        negative: torch.Tensor,
        x_adv: torch.Tensor,
        loss: torch.Tensor,
        idx: torch.Tensor,
        better: torch.Tensor,
        neg: torch.Tensor,
        cand: torch.Tensor,
        new_loss: torch.Tensor,
        start: int,
        end: int,
        new: bool,
        linf: bool,
    ) -> None:
        """Keep the flips that did not raise the loss (positions ``better`` into ``idx``; the setup query
        is kept unconditionally): under linf a candidate differs from x_adv only in the flipped chunk."""
        if new:
            negative[idx], x_adv[idx], loss[idx] = neg, cand, new_loss
            return
        kept = idx[better]
        b = len(idx)
        negative[kept, start:end] = neg[:, start:end].index_select(0, better)
        if linf:
            x_adv.view(len(x_adv), -1)[kept, start:end] = cand.view(b, -1)[:, start:end].index_select(
                0, better
            )
        else:  # the l2 projection rescales the whole image
            x_adv[kept] = cand.index_select(0, better)
        loss[kept] = new_loss[better]
