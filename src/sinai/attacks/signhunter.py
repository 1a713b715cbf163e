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
        while True:
            idx = oracle.live()
            if not len(idx):
                break
            h, i, new = level[idx], chunk[idx], fresh[idx]
            length = (n + 2**h - 1) // 2**h  # ceil(n / 2**h)
            start, end = i * length, torch.clamp((i + 1) * length, max=n)
            flip = (coords >= start[:, None]) & (coords < end[:, None]) & ~new[:, None]
            every = len(idx) == num  # all images live (the common case): no gathers
            xi, oi, ni = (x, origin, negative) if every else (x[idx], origin[idx], negative[idx])
            neg = (ni ^ flip) & ~new[:, None]  # a fresh search starts from s = 1
            s = 1.0 - 2.0 * neg.float()
            cand = threat.project(oi + step * s.view_as(xi), xi)
            logits = oracle(cand, idx)
            ok = ~torch.isnan(logits).any(1)
            if not bool(ok.all()):
                idx, cand, neg, new, h, i, end = idx[ok], cand[ok], neg[ok], new[ok], h[ok], i[ok], end[ok]
                logits = logits[ok]
            new_loss = margin_loss(logits, y[idx])

            keep = new | (new_loss <= loss[idx])  # the setup query defines f_best unconditionally
            kept = idx[keep]
            negative[kept], x_adv[kept], loss[kept] = neg[keep], cand[keep], new_loss[keep]

            # Next chunk; next level after the last chunk; restart after the last level.
            i = torch.where(new, i, i + 1)
            level_done = ~new & ((i == 2**h) | (end == n))
            h, i = torch.where(level_done, h + 1, h), torch.where(level_done, 0, i)
            restart = h == last_level + 1
            origin[idx[restart]] = x_adv[idx[restart]]
            level[idx], chunk[idx] = torch.where(restart, 0, h), i
            fresh[idx] = restart
        return x_adv
