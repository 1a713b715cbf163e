"""What the white-box attacks share: gradients through the deployed model, judged by the Oracle.

A white-box attacker holds the model and its defense (Athalye et al. 2018; Carlini et al. 2019). Each
attack here wraps an implementation from an attack library (torchattacks, foolbox, autoattack) and
writes only :meth:`WhiteBoxAttack.perturb`: the shared ``run`` hands it the oracle's differentiable
view of the *defended* model (noise on, M-sample EOT with ``eot`` = M, straight-through with ``bpda``),
in chunks of the live images, under a seed; the final images are then judged by the Oracle: one
counted query each, broken when the majority of the deployed model's noisy passes is wrong (seed 001
Tables 1-2 and 7-9, seed 004 section 4). Gradient forwards are tallied apart from the query budget.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Attack
from .oracle import Oracle
from .threat import ThreatModel


class WhiteBoxAttack(Attack):
    """Base of the gradient attacks: subclasses implement :meth:`perturb` on one chunk of images."""

    kind = "white-box"
    gradients = True
    #: whether the final images are projected onto the threat's ball before judging (a minimum-norm
    #: attack such as C&W is judged as found: outside the ball it does not count)
    projected = True

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        model = oracle.differentiable().eval()
        live = oracle.live()
        x_adv = x.clone()
        chunk = max(1, oracle.batch_size // oracle.eot)
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(live), chunk):
                rows = live[start : start + chunk]
                found = self.perturb(model, x[rows], y[rows], oracle.threat).detach().to(x.device)
                x_adv[rows] = oracle.threat.project(found, x[rows]) if self.projected else found.clamp(0, 1)
        oracle.judge(x_adv)
        return x_adv

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel
    ) -> torch.Tensor:
        """Adversarial images for ``x`` (labels ``y``) against ``model`` (logits, differentiable)."""
        raise NotImplementedError


def step_size(alpha: float | None, eps: float, steps: int) -> float:
    """``alpha`` or the usual 2.5 * eps / steps (Madry et al. 2018)."""
    return alpha if alpha is not None else 2.5 * eps / steps
