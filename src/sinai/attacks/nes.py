"""NES: projected gradient descent on a natural-evolution-strategies gradient estimate.

Ilyas, Engstrom, Athalye, Lin, "Black-box Adversarial Attacks with Limited Queries and Information",
ICML 2018 (Algorithm 1, query-limited setting). Each iteration estimates the gradient of the loss with
``n_samples`` antithetic Gaussian probes ``x + sigma * u`` / ``x - sigma * u`` (one query each) and
takes one PGD step: ``x - lr * sign(g)`` (linf) or ``x - lr * g / ||g||_2`` (l2), projected on the
eps-ball and [0, 1]. The new point is not queried (the paper's algorithm does not); success is seen
by the oracle at the probes, which lie inside the ball too (they are projected).

Defaults are RFD's (Appendix D.3): linf 60 samples, sigma 0.01, lr 0.005; l2 30 samples, sigma
0.005, lr 1. ``momentum`` (default off) is the authors' code's ``g = m * g_prev + (1 - m) * g``.
The loss is the margin ``z_y - max_{j != y} z_j`` on logits by default (the paper uses cross-entropy,
``loss="ce"``), minimized.
"""

from __future__ import annotations

import torch

from .base import Attack, check_loss, l2_normalize, project, score_loss, with_verified
from .oracle import Oracle

NES_DEFAULTS = {"linf": (60, 0.01, 0.005), "l2": (30, 0.005, 1.0)}  # n_samples, sigma, lr (RFD D.3)


class NES(Attack):
    """NES gradient estimation + PGD (Ilyas et al. 2018a), untargeted, linf or l2.

    ``n_samples`` (even) queries per gradient estimate, ``sigma`` the search standard deviation,
    ``lr`` the PGD step, ``momentum`` on the estimate, ``loss`` one of margin/ce/prob.
    ``max_candidates`` caps the probes sent in one oracle call (memory on large images): live images
    are split into groups of at most that many probes, one oracle call per group and iteration.
    """

    name = "nes"

    def __init__(
        self,
        *,
        norm: str = "linf",
        eps: float = 0.05,
        seed: int = 0,
        n_samples: int | None = None,
        sigma: float | None = None,
        lr: float | None = None,
        momentum: float = 0.0,
        loss: str = "margin",
        max_candidates: int = 4096,
    ) -> None:
        super().__init__(norm=norm, eps=eps, seed=seed)
        d_samples, d_sigma, d_lr = NES_DEFAULTS[self.norm]
        self.n_samples = d_samples if n_samples is None else int(n_samples)
        self.sigma = d_sigma if sigma is None else float(sigma)
        self.lr = d_lr if lr is None else float(lr)
        if self.n_samples < 2 or self.n_samples % 2:
            raise ValueError(f"n_samples must be an even number >= 2 (antithetic pairs), got {n_samples}")
        if self.sigma <= 0 or self.lr <= 0:
            raise ValueError("sigma and lr must be positive")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.loss = check_loss(loss)
        self.max_candidates = max(int(max_candidates), self.n_samples)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Attack all images of ``x`` until each succeeds or spends its budget; return x_adv."""
        self.check(oracle, x, y)
        home, device = x.device, oracle.device
        x, y = x.to(device).float(), y.to(device).long()
        gen = self.generator(device)
        n, half = self.n_samples, self.n_samples // 2
        x_adv = x.clone()
        g_prev = torch.zeros_like(x) if self.momentum else None
        group = self.max_candidates // n
        while True:
            live = torch.nonzero(~oracle.done).flatten()
            if not len(live):
                break
            for idx in live.split(group):
                b = len(idx)
                u = torch.randn((b, half, *x.shape[1:]), generator=gen, device=device)
                u = torch.cat([u, -u], dim=1)  # (b, n, C, H, W): antithetic pairs
                probes = project(
                    (x_adv[idx, None] + self.sigma * u).flatten(0, 1),
                    x[idx].repeat_interleave(n, 0),
                    self.norm,
                    self.eps,
                )
                logits = oracle(probes, idx.repeat_interleave(n))
                keep = ~oracle.done[idx]  # every probe answered and not yet broken
                if not keep.any():
                    continue
                idx, u = idx[keep], u[keep]
                losses = score_loss(
                    logits.view(b, n, -1)[keep].flatten(0, 1), y[idx].repeat_interleave(n), self.loss
                ).view(-1, n)
                grad = (losses.view(-1, n, *([1] * (x.dim() - 1))) * u).mean(1) / self.sigma
                if g_prev is not None:
                    grad = self.momentum * g_prev[idx] + (1.0 - self.momentum) * grad
                    g_prev[idx] = grad
                step = grad.sign() if self.norm == "linf" else l2_normalize(grad)
                x_adv[idx] = project(x_adv[idx] - self.lr * step, x[idx], self.norm, self.eps)
        return with_verified(oracle, x_adv).to(home)
