"""What every attack shares: the threat model (norm, eps), a private generator, and small helpers.

An attack is a class with keyword-only hyper-parameters (the papers' defaults) and one method,
``run(oracle, x, y) -> x_adv``, batched over all images that are still live: each iteration makes
one oracle call for the live set, and images leave as soon as the oracle says they are done.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from .oracle import Oracle

NORMS = ("linf", "l2")
LOSSES = ("margin", "ce", "prob")


class Attack:
    """Base of the query-based attacks: validates the threat model and owns a seeded generator."""

    name: ClassVar[str] = "attack"
    norms: ClassVar[tuple[str, ...]] = NORMS
    output: ClassVar[str] = "scores"  # what the attack needs from the oracle: "scores" or "labels"

    def __init__(self, *, norm: str = "linf", eps: float = 0.05, seed: int = 0) -> None:
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; use one of {', '.join(NORMS)}")
        if norm not in self.norms:
            raise ValueError(f"{self.name} is defined for {', '.join(self.norms)} only, not {norm}")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        if norm == "linf" and eps > 1:
            raise ValueError(
                f"linf eps {eps} is larger than the pixel range [0, 1]; pixels are in [0, 1] units"
            )
        self.norm, self.eps, self.seed = norm, float(eps), seed

    def generator(self, device: torch.device) -> torch.Generator:
        """A fresh generator seeded with ``seed`` (call once per ``run``, so runs are reproducible)."""
        return torch.Generator(device=device).manual_seed(self.seed)

    def check(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a clear error when the oracle, images and labels do not fit this attack."""
        if oracle.output != self.output:
            raise ValueError(
                f"{self.name} is a {'score' if self.output == 'scores' else 'decision'}-based attack: "
                f"it needs an oracle with output={self.output!r}, got {oracle.output!r}"
            )
        if len(x) != len(oracle.labels) or len(y) != len(x):
            raise ValueError(
                f"{len(x)} images, {len(y)} labels and an oracle for {len(oracle.labels)} images"
            )
        if self.norm == "l2" and self.eps > math.sqrt(x[0].numel()):
            raise ValueError(f"l2 eps {self.eps} is larger than the diameter of the image cube")

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Attack every image of ``x`` (labels ``y``, image i is oracle index i); return the final x_adv."""
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted margin ``z_y - max_{j != y} z_j`` per row: negative means misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` (linf or l2) intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * (eps / norms).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def perturbation_norm(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image linf or l2 norm of ``x_adv - x``."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def score_loss(logits: torch.Tensor, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
    """Per-row loss an untargeted attack minimizes: margin, log p_y (``"ce"``: minus CE) or p_y."""
    if kind == "margin":
        return margin_loss(logits, y)
    logp = F.log_softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    return logp if kind == "ce" else logp.exp()


def check_loss(kind: str, allowed: tuple[str, ...] = LOSSES) -> str:
    """Validate a ``loss=`` keyword."""
    if kind not in allowed:
        raise ValueError(f"loss must be one of {', '.join(allowed)}, got {kind!r}")
    return kind


def with_verified(oracle: Oracle, x_adv: torch.Tensor) -> torch.Tensor:
    """``x_adv`` with the oracle's verified adversarial example in the rows of the images it broke."""
    if oracle.x_adv is None:
        return x_adv
    found = oracle.success & ~torch.isnan(oracle.x_adv.flatten(1)).any(1)
    return torch.where(found.view(-1, *([1] * (x_adv.dim() - 1))), oracle.x_adv, x_adv)


def l2_normalize(t: torch.Tensor) -> torch.Tensor:
    """Each row of ``t`` divided by its l2 norm (zero rows stay zero)."""
    norms = t.flatten(1).norm(dim=1).clamp_min(1e-12)
    return t / norms.view(-1, *([1] * (t.dim() - 1)))
