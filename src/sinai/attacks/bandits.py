"""Bandits-TD: gradient priors (time and data) learned online by a bandit, then PGD on the image.

Ilyas, Engstrom, Madry, "Prior Convictions: Black-Box Adversarial Attacks with Bandits and Priors",
ICLR 2019 (Algorithms 1-3, Bandits-TD). A prior ``v`` on the loss gradient lives at a lower resolution
(data prior: tiles of ``tile`` x ``tile`` pixels share one value) and is carried over iterations (time
prior). Each iteration spends two queries: with exploration ``delta * u`` (u Gaussian, unit expected
norm) it evaluates the loss at ``x + fd_eta * q / ||q||`` for ``q = v + delta*u`` and ``q = v - delta*u``,
turns the difference into a directional derivative, and updates the prior with ``online_lr``
(exponentiated gradients on v in [-1, 1] for linf, plain gradient ascent for l2). Then the image takes a
step along the (upsampled) prior: ``x + image_lr * sign(v)`` (linf) or ``x + image_lr * v / ||v||``
(l2), projected on the eps-ball and [0, 1]. The two probes are projected too, so every query lies in
the threat model.

Defaults are the paper's (Appendix, ImageNet): linf delta 1.0, online_lr 100, image_lr 0.01, fd_eta 0.1;
l2 delta 0.01, online_lr 0.1, image_lr 0.5, fd_eta 0.01; tiles of about 6 pixels (the authors' 50 x 50
prior on 299 x 299 images). On 28 x 28 MNIST a tile of 4 (a 7 x 7 prior) is a natural choice. The loss
is the margin on logits by default (the paper ascends cross-entropy, ``loss="ce"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Attack, check_loss, generator, l2_normalize, register_attack, score_loss
from .oracle import Oracle

#: delta (exploration), online_lr (prior lr), image_lr, fd_eta per norm: the paper's Bandits-TD settings.
BANDITS_DEFAULTS = {"linf": (1.0, 100.0, 0.01, 0.1), "l2": (0.01, 0.1, 0.5, 0.01)}


@register_attack("bandits")
class Bandits(Attack):
    """Bandits-TD (Ilyas et al. 2019), untargeted, linf or l2: two queries per iteration.

    ``tile``: side in pixels of a data-prior tile (1 = no tiling); ``exploration`` (delta),
    ``online_lr`` (prior step), ``image_lr`` (image step), ``fd_eta`` (finite-difference probe length);
    ``None`` takes the paper's default for the norm. ``loss``: margin/ce/prob (minimized).
    """

    def __init__(
        self,
        *,
        tile: int = 6,
        exploration: float | None = None,
        online_lr: float | None = None,
        image_lr: float | None = None,
        fd_eta: float | None = None,
        loss: str = "margin",
    ) -> None:
        self.tile = int(tile)
        self.exploration = None if exploration is None else float(exploration)
        self.online_lr = None if online_lr is None else float(online_lr)
        self.image_lr = None if image_lr is None else float(image_lr)
        self.fd_eta = None if fd_eta is None else float(fd_eta)
        if self.tile < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {tile}")
        given = [v for v in (self.exploration, self.online_lr, self.image_lr, self.fd_eta) if v is not None]
        if given and min(given) <= 0:
            raise ValueError("exploration, online_lr, image_lr and fd_eta must be positive")
        self.loss = check_loss(loss)

    def settings(self, norm: str) -> tuple[float, float, float, float]:
        """(exploration, online_lr, image_lr, fd_eta) for ``norm``: the given values, else the paper's."""
        given = (self.exploration, self.online_lr, self.image_lr, self.fd_eta)
        return tuple(d if v is None else v for v, d in zip(given, BANDITS_DEFAULTS[norm], strict=True))

    @staticmethod
    def _prior_step(prior: torch.Tensor, grad: torch.Tensor, norm: str, online_lr: float) -> torch.Tensor:
        """One online step on the prior: exponentiated gradients in [-1, 1] (linf) or gradient ascent (l2)."""
        if norm == "l2":
            return prior + online_lr * grad
        # The paper's EG step on r = (v + 1) / 2, r * e^a / (r * e^a + (1 - r) * e^-a) with a = lr * g,
        # is exactly v <- tanh(atanh(v) + a): the same update without overflow (v is kept 1e-6 inside
        # (-1, 1), where float32 would otherwise freeze a saturated coordinate for good).
        return torch.tanh(torch.atanh(prior.clamp(-1 + 1e-6, 1 - 1e-6)) + online_lr * grad)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack all images of ``x`` until each succeeds or spends its budget; return x_adv."""
        threat, device = oracle.threat, oracle.device
        gen = generator(device, seed)
        exploration, online_lr, image_lr, fd_eta = self.settings(threat.norm)
        channels, height, width = x.shape[1:]
        prior_hw = (math.ceil(height / self.tile), math.ceil(width / self.tile))
        prior = torch.zeros((len(x), channels, *prior_hw), device=device)
        dim = prior[0].numel()

        # Nearest upsampling copies prior cells to pixels: F.interpolate's source cell of each pixel, found
        # once, so that upsampling is one index_select (the same values, much faster on a CPU).
        rows, cols = (
            F.interpolate(
                torch.arange(float(k), device=device).view(shape), size=size, mode="nearest"
            ).flatten()
            for k, shape, size in (
                (prior_hw[0], (1, 1, -1, 1), (height, 1)),
                (prior_hw[1], (1, 1, 1, -1), (1, width)),
            )
        )
        source = (rows.long()[:, None] * prior_hw[1] + cols.long()[None, :]).flatten()

        def up(t: torch.Tensor) -> torch.Tensor:
            if self.tile == 1:
                return t
            return (
                t.reshape(-1, dim // channels).index_select(1, source).view(len(t), channels, height, width)
            )

        x_adv = x.clone()
        last, xi = None, x
        while True:
            idx = oracle.live()
            if not len(idx):
                break
            b = len(idx)
            if idx is not last:  # the oracle hands out the same live set until an image finishes
                last, xi = idx, x.index_select(0, idx)
            noise = exploration * torch.randn((b, *prior.shape[1:]), generator=gen, device=device)
            noise = noise / math.sqrt(dim)
            pi = prior[idx]
            q = up(torch.stack([pi + noise, pi - noise], dim=1).flatten(0, 1))
            moved = x_adv.index_select(0, idx)[:, None] + fd_eta * l2_normalize(q).view(b, 2, *x.shape[1:])
            probes = threat.project_probes(moved, xi)
            logits = oracle(probes, idx.repeat_interleave(2))  # [q1, q2] of each image, in order
            keep = ~oracle.done[idx]  # both probes answered and not yet broken
            if not keep.any():
                continue
            answered, xk = logits.view(b, 2, -1), xi
            if not bool(keep.all()):
                idx, noise, answered, xk = idx[keep], noise[keep], answered[keep], xi[keep]
            # The paper ascends its loss: use the objective -L (L = loss minimized here).
            gain = -score_loss(answered.flatten(0, 1), y[idx].repeat_interleave(2), self.loss).view(-1, 2)
            deriv = (gain[:, 0] - gain[:, 1]) / (fd_eta * exploration)
            prior[idx] = self._prior_step(prior[idx], deriv.view(-1, 1, 1, 1) * noise, threat.norm, online_lr)
            direction = up(prior[idx])
            step = direction.sign() if threat.norm == "linf" else l2_normalize(direction)
            x_adv[idx] = threat.project(x_adv.index_select(0, idx) + image_lr * step, xk)
        return x_adv
