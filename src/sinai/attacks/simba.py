"""SimBA and SimBA-DCT: greedy steps along one orthonormal basis direction per iteration.

Guo, Gardner, You, Wilson, Weinberger, "Simple Black-box Adversarial Attacks", ICML 2019 (Algorithm 1).
Each iteration takes the next direction ``q`` of a random ordering of an orthonormal basis (drawn once
per run and per image) and tries ``x + step * q``; if the loss went down the step is kept (one query),
otherwise ``x - step * q`` is tried (a second query) and kept if it is better. The paper's step is
``epsilon = 0.2`` (here ``step``) and its loss the true-class probability (``loss="prob"``); the default
here is the margin on logits. The starting loss costs one query per image.

Each image runs this as its own state machine: at every oracle call it makes its next query, ``+q`` of
its next direction or ``-q`` of its current one, and one call answers all live images, so the batch
stays full (no second, smaller call for the images whose ``+q`` did not help). An image's queries are
the same alone as in a batch.

``SimBA`` uses the pixel basis; ``SimBADCT`` the 2-D orthonormal DCT basis, low frequencies first: with
``order="strided"`` (the authors' code, used by SND Appendix B.1 with ``freq_dims=28, stride=7`` on
224 x 224 ImageNet) the ``freq_dims`` x ``freq_dims`` lowest frequencies of every channel come first in
random order, then rings of ``stride`` more rows/columns, each ring in random order; ``order="rand"``
stays inside the low-frequency block. By default ``freq_dims`` is 1/8 of the image side and ``stride``
1/4 of ``freq_dims`` (28 and 7 at 224). When the ordering is used up it starts again.

Threat model: every candidate is projected on the eps-ball (the evaluation's eps, not the step) and
[0, 1], so an image stops moving along directions that would leave it; linf works the same way (the
authors' ``linf_bound`` clamp).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .base import Attack, check_loss, generator, register_attack, score_loss
from .decision import view4
from .oracle import Oracle

ORDERS = ("strided", "rand")


def dct_matrix(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (n x n): row k is the k-th cosine, ``D @ D.T = I``."""
    k = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    i = torch.arange(n, dtype=torch.float64, device=device)[None, :]
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


@register_attack("simba")
class SimBA(Attack):
    """SimBA with the pixel basis (Guo et al. 2019), untargeted, l2 (the paper's) or linf.

    ``step``: the move along a basis direction (the paper's epsilon, 0.2); ``loss``: margin (default),
    prob (the paper's p(y|x)) or ce (log p(y|x)).
    """

    def __init__(self, *, step: float = 0.2, loss: str = "margin") -> None:
        if step <= 0:
            raise ValueError(f"step must be positive, got {step}")
        self.step = float(step)
        self.loss = check_loss(loss)

    # ------------------------------------------------------------------------------------- basis
    def _rings(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """(D,) priority of each basis direction: lower rings first, inf never (pixel basis: all 0)."""
        return torch.zeros(shape.numel(), device=device)

    def _order(
        self, n: int, shape: torch.Size, gen: torch.Generator, device: torch.device, limit: int | None = None
    ) -> torch.Tensor:
        """(n, <= limit): each image's ordering of the basis, ring by ring, random within a ring.

        Only the first ``limit`` directions are kept (an image never gets further than its budget), and
        the orderings are drawn in chunks of images, so large images (ImageNet) need little memory.
        """
        rings = self._rings(shape, device)
        cols = int(torch.isfinite(rings).sum())
        cols = cols if limit is None else max(1, min(cols, limit))
        rows = max(1, 2**24 // rings.numel())
        return torch.cat(
            [
                torch.argsort(rings + torch.rand((m, len(rings)), generator=gen, device=device), dim=1)[
                    :, :cols
                ]
                for m in [min(rows, n - i) for i in range(0, n, rows)]
            ]
        )

    def _basis(self, shape: torch.Size, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """Map flat basis coordinates (B,) to the unit basis vectors as images (B, C, H, W)."""

        def directions(coords: torch.Tensor) -> torch.Tensor:
            q = torch.zeros((len(coords), shape.numel()), device=device).scatter_(1, coords[:, None], 1.0)
            return q.view(-1, *shape)

        return directions

    # --------------------------------------------------------------------------------------- run
    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all images of ``x`` until each succeeds or spends its budget; return x_adv."""
        threat, device = oracle.threat, oracle.device
        gen = generator(device, seed)
        shape = x.shape[1:]
        order = self._order(len(x), shape, gen, device, limit=oracle.budget // oracle.eot)
        cols = order.shape[1]
        directions = self._basis(shape, device)
        x_adv = x.clone()
        loss = torch.full((len(x),), float("inf"), device=device)

        idx = oracle.live()
        if len(idx):  # the loss at the start: one query per image
            logits = oracle(x[idx], idx)
            ok = ~torch.isnan(logits).any(1)
            loss[idx[ok]] = score_loss(logits[ok], y[idx[ok]], self.loss)

        # Per image: how many directions it has tried (+q of order[i, t_i] is its next query), and
        # whether it tries -q of its current direction order[i, t_i - 1] first.
        tried = torch.zeros(len(x), dtype=torch.long, device=device)
        minus = torch.zeros(len(x), dtype=torch.bool, device=device)
        last, x_live = None, x
        while True:
            idx = oracle.live()
            if not len(idx):
                break
            if idx is not last:  # the oracle hands out the same live set until an image finishes
                last, x_live = idx, x.index_select(0, idx)
            neg = minus[idx]
            t = tried[idx] - neg.long()
            q = directions(order[idx, t % cols])
            base = x_adv if len(idx) == len(x) else x_adv.index_select(0, idx)
            step = torch.where(neg, -self.step, self.step)
            cand = threat.project(base + view4(step) * q, x_live)
            logits = oracle(cand, idx)
            ok = ~torch.isnan(logits).any(1)  # False: rows of images that were done before this query
            if bool(ok.all()):
                new = score_loss(logits, y[idx], self.loss)
            else:
                new = torch.full((len(idx),), float("inf"), device=device)
                new[ok] = score_loss(logits[ok], y[idx[ok]], self.loss)
            better = new < loss[idx]
            pos = torch.nonzero(better).flatten()
            if len(pos):
                rows = idx[pos]
                x_adv[rows] = cand.index_select(0, pos)
                loss[rows] = new[pos]
            # +q that did not help: -q of the same direction next; otherwise the next direction
            tried[idx] = t + 1
            minus[idx] = ok & ~better & ~neg
        return x_adv


@register_attack("simba-dct")
class SimBADCT(SimBA):
    """SimBA in the low-frequency DCT basis (Guo et al. 2019, SimBA-DCT).

    ``freq_dims``: side of the low-frequency block tried first (default: image side // 8);
    ``stride``: width of each further ring in ``"strided"`` order (default: freq_dims // 4);
    ``order``: "strided" (the authors' block order) or "rand" (low-frequency block only).
    """

    def __init__(
        self,
        *,
        step: float = 0.2,
        loss: str = "margin",
        freq_dims: int | None = None,
        stride: int | None = None,
        order: str = "strided",
    ) -> None:
        super().__init__(step=step, loss=loss)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        if (freq_dims is not None and freq_dims < 1) or (stride is not None and stride < 1):
            raise ValueError("freq_dims and stride must be positive")
        self.freq_dims, self.stride, self.order = freq_dims, stride, order

    def _sizes(self, shape: torch.Size) -> tuple[int, int]:
        side = min(shape[1], shape[2])
        freq = self.freq_dims if self.freq_dims is not None else max(1, side // 8)
        freq = min(freq, side)
        stride = self.stride if self.stride is not None else max(1, freq // 4)
        return freq, stride

    def _rings(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Ring 0: the freq_dims x freq_dims lowest frequencies; ring r: ``stride`` more rows/columns."""
        channels, height, width = shape
        freq, stride = self._sizes(shape)
        u = torch.arange(height, device=device)[:, None].expand(height, width)
        v = torch.arange(width, device=device)[None, :].expand(height, width)
        reach = torch.maximum(u, v)
        ring = torch.where(
            reach < freq, 0, 1 + torch.div(reach - freq, stride, rounding_mode="floor")
        ).float()
        if self.order == "rand":  # only the low-frequency block
            ring = torch.where(ring == 0, 0.0, float("inf"))
        return ring.expand(channels, height, width).flatten()

    def _basis(self, shape: torch.Size, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """DCT basis images: channel c, frequency (u, v) -> outer(D_h[u], D_w[v]) in channel c."""
        channels, height, width = shape
        dh, dw = dct_matrix(height, device), dct_matrix(width, device)

        def directions(coords: torch.Tensor) -> torch.Tensor:
            c = torch.div(coords, height * width, rounding_mode="floor")
            u = torch.div(coords % (height * width), width, rounding_mode="floor")
            v = coords % width
            plane = dh[u][:, :, None] * dw[v][:, None, :]  # (B, H, W), unit l2 norm
            if channels == 1:  # the plane is the whole image
                return plane[:, None]
            q = torch.zeros((len(coords), channels, height, width), device=device)
            q[torch.arange(len(coords), device=device), c] = plane
            return q

        return directions
