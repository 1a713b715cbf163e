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

import functools
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
    top: torch.Tensor, left: torch.Tensor, side: torch.Tensor | int, height: int, width: int
) -> torch.Tensor:
    """(B, 1, H, W) mask of the square of side ``side[b]`` (or ``side`` for all) with top-left corner
    (top[b], left[b])."""
    if isinstance(side, int):  # one side for all: the rows and columns of each corner, looked up
        in_rows, in_cols = _band(height, side, top.device)[top], _band(width, side, top.device)[left]
    else:
        rows = torch.arange(height, device=top.device)[None, :]
        cols = torch.arange(width, device=top.device)[None, :]
        top, left, side = top[:, None], left[:, None], side[:, None]
        in_rows = ((rows >= top) & (rows < top + side)).to(torch.uint8)  # (B, H)
        in_cols = ((cols >= left) & (cols < left + side)).to(torch.uint8)
    # the outer product in uint8 (0/1), read as bool: much faster than a broadcast bool `&` on a CPU
    return (in_rows[:, :, None] * in_cols[:, None, :]).view(torch.bool)[:, None]


@functools.lru_cache(maxsize=64)
def _band(size: int, side: int, device: torch.device) -> torch.Tensor:
    """(size - side + 1, size) uint8: row t marks the ``side`` positions from t on."""
    pos = torch.arange(size, device=device)
    start = torch.arange(size - side + 1, device=device)[:, None]
    return ((pos >= start) & (pos < start + side)).to(torch.uint8)


@functools.lru_cache(maxsize=64)
def _square_offsets(b: int, c: int, h: int, w: int, side: int, device: torch.device) -> torch.Tensor:
    """(B, C, side, side) flat positions in a (B, C, H, W) tensor of the square at corner (0, 0) of each
    image and channel: add ``top * W + left`` to move it."""
    image = torch.arange(b, device=device).view(-1, 1, 1, 1) * (c * h * w)
    channel = torch.arange(c, device=device).view(1, -1, 1, 1) * (h * w)
    rows = torch.arange(side, device=device).view(1, 1, -1, 1) * w
    return image + channel + rows + torch.arange(side, device=device).view(1, 1, 1, -1)


def random_corner(
    side: torch.Tensor | int, height: int, width: int, gen: torch.Generator, count: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform top-left corners in {0, ..., H - side} x {0, ..., W - side}, one per image (``count``
    images when ``side`` is one int for all)."""
    n = len(side) if count is None else count
    u = torch.rand((2, n), generator=gen, device=gen.device, dtype=torch.float64)
    top = (u[0] * (height - side + 1)).long().clamp(max=height - side)
    left = (u[1] * (width - side + 1)).long().clamp(max=width - side)
    return top, left


def unchanged(cand: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Rows where ``cand`` equals ``best`` to 1e-7 everywhere (max |difference| < 1e-7: one float
    reduction instead of an elementwise comparison)."""
    return torch.nonzero((cand - best).abs_().flatten(1).amax(1) < 1e-7).flatten()


def random_sign(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform +-1 of the given shape."""
    return torch.randint(0, 2, shape, generator=gen, device=device).float().mul_(2).sub_(1)


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
        self, x: torch.Tensor, best: torch.Tensor, side: torch.Tensor | int, eps: float, gen: torch.Generator
    ) -> torch.Tensor:
        """Give one random square per image a new +-eps per channel (Algorithm 2). ``side``: per image,
        or one int for all."""
        b, c, h, w = x.shape
        top, left = random_corner(side, h, w, gen, count=b)
        if isinstance(side, int) and c == 1:
            return self._square_only(x, best, top, left, side, eps, gen)
        win = window_mask(top, left, side, h, w)
        colour = eps * random_sign((b, c, 1, 1), gen, x.device)
        # x +- eps is inside the ball and ``best`` already is: only [0, 1] needs enforcing.
        cand = torch.where(win, (x + colour).clamp_(0.0, 1.0), best)
        if not self.max_redraws:
            return cand
        if c == 1:  # the other sign always changes the square: what redrawing until it does gives
            same = (cand - best).abs_().flatten(1).amax(1) < 1e-7  # the square changed nothing
            if bool(same.any()):
                colour = torch.where(same.view(-1, 1, 1, 1), -colour, colour)
                cand = torch.where(win, (x + colour).clamp_(0.0, 1.0), best)  # the same where unchanged
            return cand
        rows = unchanged(cand, best)
        for _ in range(self.max_redraws):  # a square that changes nothing would waste the query
            if not len(rows):
                break
            colour[rows] = eps * random_sign((len(rows), c, 1, 1), gen, x.device)
            best_r = best.index_select(0, rows)
            new = (x.index_select(0, rows) + colour.index_select(0, rows)).clamp_(0.0, 1.0)
            cand[rows] = torch.where(win.index_select(0, rows), new, best_r)
            rows = rows[unchanged(cand.index_select(0, rows), best_r)]
        return cand

    def _square_only(
        self,
        x: torch.Tensor,
        best: torch.Tensor,
        top: torch.Tensor,
        left: torch.Tensor,
        side: int,
        eps: float,
        gen: torch.Generator,
    ) -> torch.Tensor:
        """``step_linf`` for one channel and one side for all: the same candidates, computing only the
        pixels of each square (the rest is ``best``) instead of whole images."""
        b, c, h, w = x.shape
        colour = eps * random_sign((b, c, 1, 1), gen, x.device)
        pos = _square_offsets(b, c, h, w, side, x.device) + (top * w + left).view(-1, 1, 1, 1)
        xs = x.take(pos)
        value = (xs + colour).clamp_(0.0, 1.0)
        if self.max_redraws:  # a square that changes nothing would waste the query: take the other sign
            same = (value - best.take(pos)).abs_().flatten(1).amax(1) < 1e-7
            if bool(same.any()):
                colour = torch.where(same.view(-1, 1, 1, 1), -colour, colour)
                value = (xs + colour).clamp_(0.0, 1.0)
        return best.clone().put_(pos, value)

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

        # p's level at each step count, looked up instead of recomputed: an image answers at most n_iters
        # queries, so its step count stays below n_iters (p_level is used past the table all the same).
        table = p_level(torch.arange(n_iters, device=x.device), n_iters)
        side_at = sides[table].tolist()
        x_adv = x.clone()
        loss = torch.full((len(x),), float("inf"), device=x.device)
        it = torch.zeros(len(x), dtype=torch.long, device=x.device)  # update steps answered, per image
        # Every live image has answered every query so far (an unanswered one is finished), so all share
        # the step count `steps`, and linf draws its squares with one side for all (a plain int).
        steps, uniform = 0, norm == "linf"
        last, xi, yi = None, x, y
        first = True  # the first query of every image is its init point
        while True:
            idx = oracle.live()
            if not len(idx):
                break
            every = len(idx) == len(x)  # all images live (the common case): no gathers
            if idx is not last:  # the oracle hands out the same live set until an image finishes
                last = idx
                xi, yi = (x, y) if every else (x.index_select(0, idx), y[idx])
            best = x_adv if every else x_adv.index_select(0, idx)
            if first:
                cand = self.init_linf(xi, eps, gen) if norm == "linf" else self.init_l2(xi, eps, gen)
            elif uniform:
                if steps < n_iters:
                    side = side_at[steps]
                else:
                    side = int(sides[p_level(torch.tensor([steps], device=x.device), n_iters)][0])
                cand = self.step_linf(xi, best, side, eps, gen)
            else:
                done = it if every else it[idx]
                level = table[done] if steps < n_iters else p_level(done, n_iters)
                if norm == "linf":
                    cand = self.step_linf(xi, best, sides[level], eps, gen)
                else:
                    cand = self.step_l2(xi, best, level, sides[level], bank, eps, gen)
            logits = oracle(cand, idx)
            y_ok = yi
            if bool(torch.isnan(logits).any()):  # rows of images that were done before this query
                ok = ~torch.isnan(logits).any(1)
                if uniform and bool((~ok & ~oracle.done[idx]).any()):  # a NaN answer of a live image
                    uniform = False
                    it.fill_(steps)  # what every live image had made so far
                idx, cand, logits, y_ok, every = idx[ok], cand[ok], logits[ok], yi[ok], False
            new_loss = margin_loss(logits, y_ok)
            # always true for the init point (inf)
            better = new_loss < (loss if every else loss.index_select(0, idx))
            pos = torch.nonzero(better).flatten()
            rows = idx.index_select(0, pos)
            x_adv.index_copy_(0, rows, cand.index_select(0, pos))
            loss.index_copy_(0, rows, new_loss.index_select(0, pos))
            if not first:
                if not uniform:  # (while uniform, every live image has made `steps` steps)
                    if every:
                        it += 1
                    else:
                        it[idx] += 1
                steps += 1
            first = False
        return x_adv
