"""Module-level noise sensitivity (SINAI section 3.1, Figures 1 and 3).

Noise of one std at the sites of one kind at a time (attention logits, pre-GeLU, pre-ReLU, input,
penultimate features), through the production mechanism ``protect``; for each (kind, std): clean
accuracy over M noisy passes, the mean squared error the noise causes at a middle layer's output and
at the logits, and optionally robust accuracy under Square at a small budget through ``evaluate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..defenses import Defense, NoiseSpec, find_sites, protect
from ..defenses.spec import check_kind
from ..evaluation.clean import clean_accuracy
from .common import RobustCheck, Row, check_stds, std_at_drop
from .probes import middle_layer

SWEEP_KINDS: tuple[str, ...] = ("attn", "gelu", "relu", "input", "feature")
DEFAULT_STDS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


@dataclass(frozen=True)
class SensitivityRow(Row):
    """One point of the sweep. ``mse_mid`` is measured at ``layer``; ``robust`` is ``None`` if not run."""

    model: str
    kind: str
    std: float
    clean: float
    clean_std: float
    base: float
    mse_mid: float
    mse_logits: float
    robust: float | None
    layer: str


@dataclass(frozen=True)
class SensitivitySummary(Row):
    """Per (model, kind): the std at which clean accuracy has dropped by each drop (``None``: the sweep
    never got there), and the robust accuracy at the largest std still within the first drop."""

    model: str
    kind: str
    base_clean: float
    std_at_drop: tuple[tuple[float, float | None], ...]  # (drop, std)
    std_within_drop: float | None
    robust_within_drop: float | None

    def as_dict(self) -> dict[str, object]:
        row: dict[str, object] = {"model": self.model, "kind": self.kind, "base_clean": self.base_clean}
        for drop, std in self.std_at_drop:
            row[f"std_at_{round(100 * drop)}pct_drop"] = std
        row["std_within_drop"] = self.std_within_drop
        row["robust_within_drop"] = self.robust_within_drop
        return row


def site_kinds(model: nn.Module, kinds: Sequence[str] | None = None) -> list[str]:
    """The requested kinds (default: every sweep kind the model has); ``ValueError`` for unknown kinds
    or kinds the model lacks."""
    found = find_sites(model)
    have = [k for k in SWEEP_KINDS if found.get(k)]
    if kinds is None:
        return have
    for kind in kinds:
        check_kind(kind)
        if kind not in have:
            raise ValueError(f"the model has no {kind!r} sites; it has: {', '.join(have)}")
    return list(kinds)


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, layer: nn.Module, batch_size: int) -> tuple:
    """Logits and the output of ``layer`` for ``x``, batch by batch, on the CPU."""
    mids, logits = [], []
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    device = next(model.parameters()).device
    try:
        for i in range(0, len(x), batch_size):
            seen.clear()
            logits.append(model(x[i : i + batch_size].to(device)).float().cpu())
            mids.append(seen[-1].float().cpu())
    finally:
        handle.remove()
    return torch.cat(logits), torch.cat(mids)


def sweep_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kinds: Sequence[str] | None = None,
    stds: Sequence[float] = DEFAULT_STDS,
    passes: int = 3,
    seed: int = 0,
    layer: str | None = None,
    robust: RobustCheck | None = None,
    robust_max_drop: float = 0.1,
    batch_size: int = 256,
    name: str | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[SensitivityRow]:
    """Clean accuracy, mid-layer / logit MSE and (with ``robust``) Square robust accuracy for
    noise at one site kind at a time, for every std of ``stds``. ``layer`` defaults to
    :func:`~sinai.analysis.probes.middle_layer`. Robust accuracy is skipped (``None``) where clean
    accuracy is already more than ``robust_max_drop`` below the undefended model's: the model is broken
    there anyway, and attacks are the slow part. ``on_step`` is called after each (kind, std)."""
    stds = check_stds(stds)
    kinds = site_kinds(model, kinds)
    layer = layer or middle_layer(model)
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"no layer named {layer!r} in the model to measure the MSE at")
    name = name or getattr(model, "name", type(model).__name__)
    base = clean_accuracy(model, x, y, passes=1, batch_size=batch_size).mean
    clean_logits, clean_mid = _outputs(model, x, modules[layer], batch_size)
    base_robust: float | None = None
    if robust is not None and 0.0 in stds:
        base_robust = robust(model, seed=seed)
    rows = []
    for kind in kinds:
        for std in stds:
            if std == 0:
                rows.append(SensitivityRow(name, kind, std, base, 0.0, base, 0.0, 0.0, base_robust, layer))
                if on_step:
                    on_step()
                continue
            defense = Defense({kind: NoiseSpec(std=std)}, name=f"{kind}-noise")
            defended = protect(model, defense, seed=seed)
            try:
                acc = clean_accuracy(defended, x, y, passes=passes, batch_size=batch_size)
                logits, mid = _outputs(defended, x, modules[layer], batch_size)
            finally:
                defended.remove()
            rob = None
            if robust is not None and acc.mean >= base - robust_max_drop:
                rob = robust(model, defense, seed=seed)
            rows.append(
                SensitivityRow(
                    name,
                    kind,
                    std,
                    acc.mean,
                    acc.std,
                    base,
                    (mid - clean_mid).pow(2).mean().item(),
                    (logits - clean_logits).pow(2).mean().item(),
                    rob,
                    layer,
                )
            )
            if on_step:
                on_step()
    return rows


def sensitivity_summary(
    rows: Sequence[SensitivityRow], drops: Sequence[float] = (0.01, 0.02)
) -> list[SensitivitySummary]:
    """Per (model, kind): the std at which clean accuracy has dropped by each of ``drops`` (interpolated
    on the sweep; ``None`` when the sweep never got there) and the robust accuracy at the largest std
    still within the first drop."""
    out = []
    for key in dict.fromkeys((r.model, r.kind) for r in rows):
        sel = [r for r in rows if (r.model, r.kind) == key]
        base = sel[0].base
        stds, cleans = [r.std for r in sel], [r.clean for r in sel]
        at_drop = tuple((d, std_at_drop(stds, cleans, base, d)) for d in drops)
        within = [r for r in sel if r.clean >= base - drops[0] and r.robust is not None]
        best = max(within, key=lambda r: r.std, default=None)
        out.append(
            SensitivitySummary(
                key[0],
                key[1],
                base,
                at_drop,
                None if best is None else best.std,
                None if best is None else best.robust,
            )
        )
    return out
