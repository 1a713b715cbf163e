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

from .base import Attack, check_loss, generator, l2_normalize, register_attack, score_loss
from .oracle import Oracle

NES_DEFAULTS = {"linf": (60, 0.01, 0.005), "l2": (30, 0.005, 1.0)}  # n_samples, sigma, lr (RFD D.3)


@register_attack("nes")
class NES(Attack):
    """NES gradient estimation + PGD (Ilyas et al. 2018a), untargeted, linf or l2.

    ``n_samples`` (even) queries per gradient estimate, ``sigma`` the search standard deviation,
    ``lr`` the PGD step (None: RFD's default for the norm), ``momentum`` on the estimate, ``loss`` one
    of margin/ce/prob.
    ``max_candidates`` caps the probes sent in one oracle call (memory on large images): live images
    are split into groups of at most that many probes, one oracle call per group and iteration.
    """

    def __init__(
        self,
        *,
        n_samples: int | None = None,
        sigma: float | None = None,
        lr: float | None = None,
        momentum: float = 0.0,
        loss: str = "margin",
        max_candidates: int = 4096,
    ) -> None:
        self.n_samples = None if n_samples is None else int(n_samples)
        self.sigma = None if sigma is None else float(sigma)
        self.lr = None if lr is None else float(lr)
        if self.n_samples is not None and (self.n_samples < 2 or self.n_samples % 2):
            raise ValueError(f"n_samples must be an even number >= 2 (antithetic pairs), got {n_samples}")
        if (self.sigma is not None and self.sigma <= 0) or (self.lr is not None and self.lr <= 0):
            raise ValueError("sigma and lr must be positive")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.loss = check_loss(loss)
        self.max_candidates = int(max_candidates)

    def settings(self, norm: str) -> tuple[int, float, float]:
        """(n_samples, sigma, lr) for ``norm``: the given values, RFD's defaults for the others."""
        d_samples, d_sigma, d_lr = NES_DEFAULTS[norm]
        return (
            d_samples if self.n_samples is None else self.n_samples,
            d_sigma if self.sigma is None else self.sigma,
            d_lr if self.lr is None else self.lr,
        )

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all images of ``x`` until each succeeds or spends its budget; return x_adv."""
        threat, device = oracle.threat, oracle.device
        gen = generator(device, seed)
        n, sigma, lr = self.settings(threat.norm)
        half = n // 2
        x_adv = x.clone()
        g_prev = torch.zeros_like(x) if self.momentum else None
        group = max(self.max_candidates, n) // n
        while True:
            live = oracle.live()
            if not len(live):
                break
            for idx in live.split(group):
                b = len(idx)
                half_u = torch.randn((b, half, *x.shape[1:]), generator=gen, device=device)
                u = torch.empty((b, n, *x.shape[1:]), device=device)  # antithetic pairs: [u, -u]
                u[:, :half] = half_u
                torch.neg(half_u, out=u[:, half:])
                xi = x.index_select(0, idx)
                probes = threat.project_probes(x_adv.index_select(0, idx)[:, None] + sigma * u, xi)
                logits = oracle(probes, idx.repeat_interleave(n))
                keep = ~oracle.done[idx]  # every probe answered and not yet broken
                if not keep.any():
                    continue
                answered = logits.view(b, n, -1)
                if not bool(keep.all()):
                    idx, u, answered, xi = idx[keep], u[keep], answered[keep], xi[keep]
                losses = score_loss(answered.flatten(0, 1), y[idx].repeat_interleave(n), self.loss).view(
                    -1, n
                )
                grad = (losses.view(-1, n, *([1] * (x.dim() - 1))) * u).mean(1) / sigma
                if g_prev is not None:
                    grad = self.momentum * g_prev[idx] + (1.0 - self.momentum) * grad
                    g_prev[idx] = grad
                step = grad.sign() if threat.norm == "linf" else l2_normalize(grad)
                x_adv[idx] = threat.project(x_adv.index_select(0, idx) - lr * step, xi)
        return x_adv
