"""SINAI-selective at inference (seed 001 Sec. 3.2, Eq. 2, Alg. 2; App. B for N:M): the ``approx`` site.

At every conv that carries a learned approximation branch (:mod:`sinai.models.selective`), the hook computes
the exact output z and the approximation z~ = W~_Q P Q(x) + b~_Q, and per sample keeps exact the outputs
with the largest z~ (signed: the paper's "larger than the threshold") and gives the rest their z~:

    z' = z * m + z~ * (1 - m)                                     (Eq. 2), before BatchNorm

- top-k (``n = m = 0``): over each sample's C*H*W outputs, exactly ``ceil((1 - ratio) * C*H*W)`` are exact;
- N:M: the outputs are grouped as M consecutive channels at one spatial position (channels
  ``[g*M, (g+1)*M)`` at (h, w)); in every group the N smallest by z~ are approximated and the M - N largest
  exact (App. B: "noise injection into 1 to 7 out of every 8 neurons"; its BitOPs fit N approximated).
  The conv's channel count must be a multiple of M.

The defense is deterministic once P is drawn (no generator is used), so ``Defense.randomized`` is False
and EOT proves nothing against it. Gradients: without BPDA they are autograd's, which are zero through
the rounding of Q(x) and through the mask (the exact outputs carry the gradient of the conv, the
approximated ones almost none: gradient masking); under ``DefendedModel.straight_through()`` (BPDA) the
forward is z' and the backward that of the exact conv, ``z + (z' - z).detach()``. ``.clean()`` is the
exact network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .hooks import SiteHook
from .sites import Site
from .spec import SelectiveSpec

if TYPE_CHECKING:
    from .protect import DefendedModel

#: The attribute of a conv holding its branch (``sinai.models.selective.APPROX_ATTR``).
APPROX_ATTR = "approx"


def exact_mask(approx: torch.Tensor, ratio: float, *, n: int = 0, m: int = 0) -> torch.Tensor:
    """Boolean mask (True = computed exactly) over a conv output ``approx`` = z~ of shape (B, C, ...).

    Top-k: per sample, the ``ceil((1 - ratio) * C*H*W)`` largest entries. N:M (``n``, ``m`` > 0): in every
    group of ``m`` consecutive channels at one position, the ``m - n`` largest (``n`` approximated).
    """
    from .protect import selected_count

    if n and m:
        b, c = approx.shape[:2]
        if c % m:
            raise ValueError(f"N:M needs the conv's channel count to be a multiple of M, got C={c}, M={m}")
        groups = approx.reshape(b, c // m, m, *approx.shape[2:])
        keep = groups.topk(m - n, dim=2, largest=True, sorted=False).indices
        mask = torch.zeros(groups.shape, dtype=torch.bool, device=approx.device).scatter_(2, keep, True)
        return mask.view_as(approx)
    flat = approx.reshape(approx.shape[0], -1)
    keep = selected_count(1.0 - ratio, flat.shape[1])
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=approx.device)
    if keep:
        mask.scatter_(1, flat.topk(keep, dim=1, largest=True, sorted=False).indices, True)
    return mask.view_as(approx)


def selective_output(
    conv: nn.Module, x: torch.Tensor, z: torch.Tensor, spec: SelectiveSpec, *, bpda: bool = False
) -> torch.Tensor:
    """Eq. 2 at one conv: ``z'`` from its input ``x`` and exact output ``z``; ``bpda``: gradient of ``z``."""
    approx = getattr(conv, APPROX_ATTR)(x, ste=False)
    mixed = torch.where(exact_mask(approx.detach(), spec.ratio, n=spec.n, m=spec.m), z, approx)
    if bpda and torch.is_grad_enabled() and z.requires_grad:
        return z + (mixed - z).detach()
    return mixed


class SelectiveHook(SiteHook):
    """The hook at one ``approx`` site (a forward hook on the conv): replaces its output by Eq. 2's mix
    while ``owner`` (the :class:`~sinai.defenses.protect.DefendedModel`) is active."""

    def __init__(self, owner: DefendedModel, site: Site, spec: SelectiveSpec) -> None:
        super().__init__(site)
        self.owner = owner
        self.spec = spec
        self.calls = 0
        channels = getattr(site.module, "out_channels", None)
        if spec.m and channels is not None and channels % spec.m:
            raise ValueError(
                f"N:M groups M={spec.m} consecutive channels, but conv {site.name!r} has {channels}; "
                "choose M dividing every conv's channel count"
            )

    def enabled(self) -> bool:
        return self.owner.active

    def _post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled():
            return None
        self.calls += 1
        if getattr(self.owner, "recording", None) is not None:  # calibrating noise thresholds
            return None
        return selective_output(
            module, args[0], output, self.spec, bpda=bool(getattr(self.owner, "bpda", False))
        )


__all__ = ["SelectiveHook", "exact_mask", "selective_output"]
