"""Square Attack: score-based random search with square-shaped updates (linf and l2).

Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV 2020 (arXiv:1906.03526). Untargeted, margin loss on the logits: an update is kept only
if it lowers the loss. linf starts from vertical stripes of +-eps and re-draws one random square per step
(Algorithm 2); l2 starts from a grid of opposite-signed pseudo-Gaussian bumps and, per step, moves the
mass of a second random window into a new bump in the first (Algorithm 3). The side of the square follows
the paper's piecewise-constant schedule of p, rescaled to the query budget of the run.

Every image has its own random windows (the authors' code shares the l2 windows across the batch), and
window corners are drawn from the paper's {0, ..., w - s}.
"""

from __future__ import annotations

import math

import torch

from .base import Attack, generator, margin_loss, register_attack
from .oracle import Oracle
from .threat import project

#: Iterations of a 10000-query run after which p halves (the authors' schedule; rescaled to the budget).
P_BOUNDARIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
#: The paper's p_init per norm.
P_INIT = {"linf": 0.05, "l2": 0.1}


def p_level(it: torch.Tensor, n_iters: int) -> torch.Tensor:
    """How many times p has halved at iteration ``it`` of ``n_iters``: p = p_init / 2**level."""
    scaled = torch.floor(it.double() / n_iters * 10000).long()
    level = torch.bucketize(scaled, torch.tensor(P_BOUNDARIES, device=it.device))
    return torch.where(scaled > 10000, torch.zeros_like(level), level)  # the paper's p_init past the end


def pseudo_gaussian(rows: int, cols: int) -> torch.Tensor:
    """Unit-norm rectangle of nested frames weighted 1/(k+1)**2 around the centre (the paper's eta)."""
    delta = torch.zeros(rows, cols, dtype=torch.float64)
    r0, c0 = rows // 2, cols // 2
    for k in range(max(r0, c0) + 1):
        delta[max(r0 - k, 0) : min(r0 + k + 1, rows), max(c0 - k, 0) : min(c0 + k + 1, cols)] += (
            1.0 / (k + 1) ** 2
        )
    norm = delta.norm()
    return delta / norm if norm > 0 else delta


def meta_pattern(s: int) -> torch.Tensor:
    """The s x s l2 update: a positive bump over the top half and a negative one below, unit norm."""
    delta = torch.cat([pseudo_gaussian(s // 2, s), -pseudo_gaussian(s - s // 2, s)])
    return (delta / delta.norm()).float()


def window_mask(
    top: torch.Tensor, left: torch.Tensor, side: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """(B, 1, H, W) mask of the square of side ``side[b]`` with top-left corner (top[b], left[b])."""
    rows = torch.arange(height, device=top.device)[None, :, None]
    cols = torch.arange(width, device=top.device)[None, None, :]
    top, left, side = top[:, None, None], left[:, None, None], side[:, None, None]
    inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    return inside[:, None]


def random_corner(
    side: torch.Tensor, height: int, width: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform top-left corners in {0, ..., H - side} x {0, ..., W - side}, one per image."""
    u = torch.rand((2, len(side)), generator=gen, device=side.device, dtype=torch.float64)
    top = (u[0] * (height - side + 1)).long().clamp(max=height - side)
    left = (u[1] * (width - side + 1)).long().clamp(max=width - side)
    return top, left


def random_sign(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform +-1 of the given shape."""
    return torch.randint(0, 2, shape, generator=gen, device=device).float() * 2 - 1


@register_attack("square")
class Square(Attack):
    """Square Attack (linf, l2): accept a random square update when the margin loss drops.

    ``p_init``: initial fraction of pixels changed per step (None: the paper's 0.05 for linf, 0.1 for
    l2). ``max_redraws``: linf re-draws the colour of a square that would not change the image
    (the authors' code loops until it does; bounded here; with one channel the other sign is the
    only such colour, so it is taken directly).
    """

    norms = ("linf", "l2")

    def __init__(self, *, p_init: float | None = None, max_redraws: int = 32) -> None:
        if p_init is not None and not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        if max_redraws < 0:
            raise ValueError(f"max_redraws must be >= 0, got {max_redraws!r}")
        self.p_init = None if p_init is None else float(p_init)
        self.max_redraws = int(max_redraws)

    def side_lengths(self, height: int, width: int, norm: str) -> list[int]:
        """Square side for each level of the p schedule (index = number of halvings of p)."""
        p_init = self.p_init if self.p_init is not None else P_INIT[norm]
        sides = []
        for level in range(len(P_BOUNDARIES) + 1):
            s = int(round(math.sqrt(p_init / 2**level * height * width)))
            if norm == "linf":
                s = min(max(s, 1), min(height, width) - 1) if min(height, width) > 1 else 1
            else:
                s = max(s, 3)
                s = min(s + 1 if s % 2 == 0 else s, min(height, width))
            sides.append(s)
        return sides

    # ------------------------------------------------------------------------------------------ init
    def init_linf(self, x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
        """Vertical stripes: one +-eps per column and channel."""
        b, c, _, w = x.shape
        return project(x + eps * random_sign((b, c, 1, w), gen, x.device), x, "linf", eps)

    def init_l2(self, x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
        """A grid of meta-patterns of side H // 5 with random orientation and per-channel sign."""
        b, c, h, w = x.shape
        s = max(h // 5, 1)
        start = max((h - s * 5) // 2, 0)
        gh, gw = max(min(h // s, (h - start) // s), 1), max(min(w // s, (w - start) // s), 1)
        tile = meta_pattern(s).to(x.device)
        flip = torch.rand((b, 1, gh, gw), generator=gen, device=x.device) > 0.5
        tiles = torch.where(flip[..., None, None], tile.T, tile)  # (B, 1, gh, gw, s, s)
        tiles = tiles * random_sign((b, c, gh, gw), gen, x.device)[..., None, None]
        grid = tiles.permute(0, 1, 2, 4, 3, 5).reshape(b, c, gh * s, gw * s)
        delta = torch.zeros_like(x)
        rows, cols = min(gh * s, h - start), min(gw * s, w - start)
        delta[:, :, start : start + rows, start : start + cols] = grid[:, :, :rows, :cols]
        delta = delta * eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        return project(x + delta, x, "l2", eps)

    # ---------------------------------------------------------------------------------------- update
    def step_linf(
        self, x: torch.Tensor, best: torch.Tensor, side: torch.Tensor, eps: float, gen: torch.Generator
    ) -> torch.Tensor:
        """Give one random square per image a new +-eps per channel (Algorithm 2)."""
        b, c, h, w = x.shape
        top, left = random_corner(side, h, w, gen)
        win = window_mask(top, left, side, h, w)
        colour = eps * random_sign((b, c, 1, 1), gen, x.device)
        # x +- eps is inside the ball and ``best`` already is: only [0, 1] needs enforcing.
        cand = torch.where(win, (x + colour).clamp(0.0, 1.0), best)
        rows = torch.nonzero(((cand - best).abs() < 1e-7).flatten(1).all(1)).flatten()
        for _ in range(self.max_redraws):  # a square that changes nothing would waste the query
            if not len(rows):
                break
            if c == 1:  # the other sign always changes the square: what redrawing until it does gives
                colour[rows] = -colour[rows]
            else:
                colour[rows] = eps * random_sign((len(rows), c, 1, 1), gen, x.device)
            cand[rows] = torch.where(win[rows], (x[rows] + colour[rows]).clamp(0.0, 1.0), best[rows])
            if c == 1:
                break
            rows = rows[((cand[rows] - best[rows]).abs() < 1e-7).flatten(1).all(1)]
        return cand

    def step_l2(
        self,
        x: torch.Tensor,
        best: torch.Tensor,
        level: torch.Tensor,
        side: torch.Tensor,
        bank: torch.Tensor,
        eps: float,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """Move the mass of window 2 and of window 1 into a new bump in window 1 (Algorithm 3)."""
        b, c, h, w = x.shape
        nu = best - x
        top1, left1 = random_corner(side, h, w, gen)
        top2, left2 = random_corner(side, h, w, gen)
        w1 = window_mask(top1, left1, side, h, w)
        union = w1 | window_mask(top2, left2, side, h, w)
        # eta*: the level's meta-pattern placed at window 1, transposed for half of the images.
        rows = torch.arange(h, device=x.device)[None, :, None] - top1[:, None, None]
        cols = torch.arange(w, device=x.device)[None, None, :] - left1[:, None, None]
        rows, cols = rows.clamp(0, bank.shape[1] - 1), cols.clamp(0, bank.shape[2] - 1)
        turn = (torch.rand(b, generator=gen, device=x.device) > 0.5)[:, None, None]
        rows, cols = torch.where(turn, cols, rows), torch.where(turn, rows, cols)
        eta = (bank[level[:, None, None], rows, cols][:, None] * w1).expand(b, c, h, w)
        rho = random_sign((b, c, 1, 1), gen, x.device)
        nu_w1 = nu * w1
        nu_temp = rho * eta + nu_w1 / (nu_w1.flatten(2).norm(dim=2)[..., None, None] + 1e-10)
        unused = (eps**2 - nu.flatten(1).pow(2).sum(1)).clamp_min(0)[:, None, None, None]
        avail = ((nu * union).flatten(2).pow(2).sum(2)[..., None, None] + unused / c).sqrt()
        new_w1 = nu_temp / nu_temp.flatten(2).norm(dim=2).clamp_min(1e-12)[..., None, None] * avail
        nu = torch.where(union, 0.0, nu) + new_w1  # window 2 emptied, window 1 rewritten (new_w1 lives on it)
        return project(x + nu, x, "l2", eps)

    # ------------------------------------------------------------------------------------------- run
    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all live images together, one oracle call per iteration; return the final x_adv."""
        norm, eps = oracle.threat.norm, oracle.threat.eps
        gen = generator(x.device, seed)
        _, _, h, w = x.shape
        n_iters = max(oracle.budget // oracle.eot, 1)  # the schedule spans the budget of the run
        sides = torch.tensor(self.side_lengths(h, w, norm), device=x.device)
        bank = None
        if norm == "l2":
            size = int(sides.max())
            bank = torch.zeros(len(sides), size, size, device=x.device)
            for k, s in enumerate(sides.tolist()):
                bank[k, :s, :s] = meta_pattern(s).to(x.device)

        x_adv = x.clone()
        loss = torch.full((len(x),), float("inf"), device=x.device)
        it = torch.zeros(len(x), dtype=torch.long, device=x.device)  # update steps answered, per image
        first = True  # the first query of every image is its init point
        while True:
            idx = oracle.live()
            if not len(idx):
                break
            every = len(idx) == len(x)  # all images live (the common case): no gathers
            xi, best = (x, x_adv) if every else (x[idx], x_adv[idx])
            if first:
                cand = self.init_linf(xi, eps, gen) if norm == "linf" else self.init_l2(xi, eps, gen)
            else:
                level = p_level(it[idx], n_iters)
                if norm == "linf":
                    cand = self.step_linf(xi, best, sides[level], eps, gen)
                else:
                    cand = self.step_l2(xi, best, level, sides[level], bank, eps, gen)
            logits = oracle(cand, idx)
            ok = ~torch.isnan(logits).any(1)  # rows of images that were done before this query
            if not bool(ok.all()):
                idx, cand, logits = idx[ok], cand[ok], logits[ok]
            new_loss = margin_loss(logits, y[idx])
            better = new_loss < loss[idx]  # always true for the init point (loss starts at inf)
            x_adv[idx[better]] = cand[better]
            loss[idx[better]] = new_loss[better]
            it[idx] += 0 if first else 1
            first = False
        return x_adv
