"""Logit-level gradient-norm analysis (SINAI section 3.2, Figures 2 and 4).

- :func:`gradient_norms`: the per-sample, per-logit gradient norms ``|dL/dz|`` before GeLU / ReLU
  (median, 95th percentile, histogram), from one backward pass per batch.
- :class:`SelectiveNoise`: noise on a ``ratio`` share of the logits of every site of one kind, chosen by
  a *selection rule*: non-critical-first or critical-first, ranked by the true per-sample gradient norm
  (a first forward + backward, then the noisy forward) or by the value proxy the defense uses (smallest
  / largest pre-activation). ``noncritical-value`` is exactly SINAI's production rule; the sweep runs
  it through ``protect`` itself and the others through this wrapper, which goes through the same
  Oracle / ``evaluate`` path and owns its seeded generator.
- :func:`rank_agreement`: how well the value proxy's ranking agrees with the gradient ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ..defenses import Defense, NoiseSpec, Site, fastnoise, find_sites, protect, selected_count, smallest_mask
from ..defenses.hooks import Generators, SiteHook
from ..defenses.protect import smallest_indices
from ..defenses.spec import SELECTIVE_KINDS, check_kind
from ..evaluation.clean import clean_accuracy
from .common import RobustCheck, Row, calibrate_std, check_ratios, check_stds, noisy_accuracy
from .probes import LOSSES, Capture, capture_gradients

RULES: tuple[str, ...] = ("noncritical-value", "critical-value", "noncritical-grad", "critical-grad")
"""Selection rules: which logits get noise first, ranked by value (the defense's proxy) or by the
true gradient norm ``|dL/dz|`` (the model's prediction is the label)."""

RULE_LABELS = {
    "noncritical-value": "non-critical-first (value proxy)",
    "critical-value": "critical-first (value proxy)",
    "noncritical-grad": "non-critical-first (gradient)",
    "critical-grad": "critical-first (gradient)",
}
DEFAULT_RATIOS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)


def selective_sites(model: nn.Module, kind: str) -> list[Site]:
    """The ``kind`` sites of ``model``; ``ValueError`` unless ``kind`` is gelu/relu and the model has it."""
    check_kind(kind)
    if kind not in SELECTIVE_KINDS:
        raise ValueError(f"selection by gradient norm applies to {SELECTIVE_KINDS} sites, not {kind!r}")
    sites = find_sites(model, [kind])[kind]
    if not sites:
        have = [k for k, v in find_sites(model).items() if v and k in SELECTIVE_KINDS]
        raise ValueError(
            f"the model has no {kind!r} sites; it has: {', '.join(have) or 'no gelu/relu sites'}"
        )
    return sites


def select_mask(score: torch.Tensor, ratio: float, *, largest: bool) -> torch.Tensor:
    """Per sample, a mask of exactly ``ceil(ratio * n)`` entries of ``score``: the largest or smallest."""
    flat = score.reshape(score.shape[0], -1)
    k = selected_count(ratio, flat.shape[1])
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=score.device)
    if k >= flat.shape[1]:
        return mask.fill_(True).view_as(score)
    if k > 0:
        mask.scatter_(1, flat.topk(k, dim=1, largest=largest, sorted=False).indices, True)
    return mask.view_as(score)


class _Selective(SiteHook):
    """The hook of :class:`SelectiveNoise` at one site: noise on the logits its rule selects."""

    def __init__(self, owner: SelectiveNoise, site: Site) -> None:
        super().__init__(site)
        self.owner = owner

    def enabled(self) -> bool:
        return self.owner._active

    def tensor(self, z: torch.Tensor) -> torch.Tensor:
        owner, name = self.owner, self.site.name
        call = owner._calls[name] = owner._calls.get(name, -1) + 1
        gen = owner.generator(z.device)
        critical = owner.rule.startswith("critical")
        score = z if owner.rule.endswith("value") else owner._scores[(name, call)]
        draw = lambda shape: torch.empty(shape, dtype=z.dtype, device=z.device).normal_(  # noqa: E731
            0.0, owner.std, generator=gen
        )
        # the production defense's selection and draw (protect.py: noise for the selected logits only, added
        # where they are): with the value rule and the same seed, the same noise
        if owner.rule == "noncritical-value" and fastnoise.supports(z):  # protect.py's compiled path
            n = z[0].numel()
            k = selected_count(owner.ratio, n)
            if k == 0:
                noisy = z
            elif k == n:
                noisy = fastnoise.add_all(z, owner.std, gen)
            else:
                noisy = fastnoise.add_exact(z, k, owner.std, gen)
            owner.last_masks[(name, call)] = noisy != z
            return noisy
        idx = smallest_indices(score, owner.ratio, largest=critical)
        if idx is None:
            owner.last_masks[(name, call)] = torch.ones(z.shape, dtype=torch.bool, device=z.device)
            return z + draw(z.shape)
        mask = torch.zeros((z.shape[0], z[0].numel()), dtype=torch.bool, device=z.device)
        owner.last_masks[(name, call)] = mask.scatter_(1, idx, True).view_as(z)
        return z.reshape(z.shape[0], -1).scatter_add(1, idx, draw(idx.shape)).view_as(z)


class SelectiveNoise(nn.Module):
    """``model`` with ``std`` noise on a ``ratio`` share of the logits entering every ``kind`` site,
    chosen per sample by ``rule`` (see :data:`RULES`); ``randomized = True`` for the protocol.

    Gradient rules cost a forward and a backward more per call: the gradient of the loss at the clean
    input, labelled by the model's own prediction, ranks the logits; then the noisy forward runs.
    ``last_masks`` holds the masks of the last forward by (site name, call).
    """

    randomized = True

    def __init__(
        self,
        model: nn.Module,
        kind: str,
        *,
        std: float,
        ratio: float,
        rule: str,
        seed: int = 0,
        loss: str = "margin",
    ) -> None:
        super().__init__()
        self.sites = selective_sites(model, kind)
        check_stds([std])
        check_ratios([ratio])
        if rule not in RULES:
            raise ValueError(f"unknown selection rule {rule!r}; rules: {', '.join(RULES)}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.model, self.kind, self.std, self.ratio, self.rule, self.loss = (
            model,
            kind,
            std,
            ratio,
            rule,
            loss,
        )
        self.num_classes = getattr(model, "num_classes", None)
        self.input_shape = getattr(model, "input_shape", None)
        self.seed = seed
        self.last_masks: dict[tuple[str, int], torch.Tensor] = {}
        self.generator = Generators(seed)
        self._scores: dict[tuple[str, int], torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._active = False
        self._handles = [_Selective(self, site).attach() for site in self.sites]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rule.endswith("grad") and 0 < self.ratio < 1:
            _, captures, _ = capture_gradients(self.model, x, None, self.sites, loss=self.loss)
            self._scores = {c.key: c.grad.abs() for c in captures}
        self._calls.clear()
        self.last_masks = {}
        self._active = True
        try:
            return self.model(x)
        finally:
            self._active = False

    def remove(self) -> None:
        """Detach the hooks (the wrapped model is left as it was)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------------- gradient norms


def _captures(model, x, y, sites, loss, batch_size) -> list[list[Capture]]:
    device = next(model.parameters()).device
    return [
        capture_gradients(model, x[i : i + batch_size].to(device), y[i : i + batch_size], sites, loss=loss)[1]
        for i in range(0, len(x), batch_size)
    ]


@dataclass(frozen=True)
class GradStats(Row):
    """Per-logit gradient norms ``|dL/dz|`` at one site (``site="all"``: pooled over the kind)."""

    model: str
    kind: str
    site: str
    logits: int
    median: float
    p95: float
    mean: float
    max: float
    zero_share: float


def gradient_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kinds: Sequence[str] = SELECTIVE_KINDS,
    loss: str = "margin",
    batch_size: int = 100,
    name: str | None = None,
) -> tuple[list[GradStats], dict[str, np.ndarray]]:
    """Statistics of ``|dL/dz|`` per site and pooled per kind (the kinds the model has), and the pooled
    values per kind (for histograms). Labels are the true labels ``y``."""
    name = name or getattr(model, "name", type(model).__name__)
    found = find_sites(model, kinds)
    sites = [s for k in kinds for s in found[k]]
    if not sites:
        raise ValueError(f"the model has none of the site kinds {tuple(kinds)}")
    per_site: dict[tuple[str, str], list[np.ndarray]] = {}
    for captures in _captures(model, x, y, sites, loss, batch_size):
        for c in captures:
            per_site.setdefault((c.site.kind, c.label), []).append(
                c.grad.abs().float().flatten().cpu().numpy()
            )
    stats, pooled = [], {}
    for kind in kinds:
        arrays = {label: np.concatenate(v) for (k, label), v in per_site.items() if k == kind}
        if not arrays:
            continue
        pooled[kind] = np.concatenate(list(arrays.values()))
        for label, values in [*arrays.items(), ("all", pooled[kind])]:
            stats.append(
                GradStats(
                    name,
                    kind,
                    label,
                    int(values.size),
                    float(np.median(values)),
                    float(np.percentile(values, 95)),
                    float(values.mean()),
                    float(values.max()),
                    float((values == 0).mean()),
                )
            )
    return stats, pooled


@dataclass(frozen=True)
class HistogramBin(Row):
    """One bin of a log-spaced histogram of ``|dL/dz|``: ``share`` of all values (zeros included)."""

    model: str
    kind: str
    bin_lo: float
    bin_hi: float
    count: int
    share: float


def histogram(values: np.ndarray, bins: int = 60, *, model: str = "", kind: str = "") -> list[HistogramBin]:
    """Log-spaced histogram of the non-zero values (zeros are reported by ``zero_share``)."""
    nonzero = values[values > 0]
    if nonzero.size == 0:
        return []
    lo, hi = np.log10(nonzero.min()), np.log10(nonzero.max())
    edges = np.logspace(lo, hi if hi > lo else lo + 1, bins + 1)
    counts, _ = np.histogram(nonzero, bins=edges)
    return [
        HistogramBin(model, kind, float(a), float(b), int(c), float(c / values.size))
        for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


# ----------------------------------------------------------------------------------- rank agreement


@dataclass(frozen=True)
class AgreementRow(Row):
    """How well the value proxy ranks one site's logits like ``|dL/dz|``: the mean per-sample Spearman
    correlation, and the proxy's ``precision`` at ``ratio`` (CSV column ``precision_at_<ratio>``)."""

    model: str
    kind: str
    site: str
    spearman: float
    precision: float
    ratio: float

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "kind": self.kind,
            "site": self.site,
            "spearman": self.spearman,
            f"precision_at_{self.ratio:g}": self.precision,
        }


def _ranks(a: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(a, axis=1, method="average")


def rank_agreement(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    kinds: Sequence[str] = SELECTIVE_KINDS,
    ratio: float = 0.5,
    loss: str = "margin",
    batch_size: int = 100,
    name: str | None = None,
) -> list[AgreementRow]:
    """Per site: the Spearman correlation between the pre-activation value (the proxy) and ``|dL/dz|``
    per sample, averaged over samples, and the *precision* of the proxy at ``ratio``: the share of the
    logits the proxy selects (the smallest values) that are also among the ``ratio`` share with the
    smallest gradient norm (ties at the threshold count as in)."""
    check_ratios([ratio])
    name = name or getattr(model, "name", type(model).__name__)
    found = find_sites(model, kinds)
    sites = [s for k in kinds for s in found[k]]
    if not sites:
        raise ValueError(f"the model has none of the site kinds {tuple(kinds)}")
    sums: dict[tuple[str, str], list[float]] = {}
    for captures in _captures(model, x, y, sites, loss, batch_size):
        for c in captures:
            z = c.value.reshape(len(c.value), -1).float()
            g = c.grad.reshape(len(c.grad), -1).abs().float()
            rz, rg = _ranks(z.cpu().numpy()), _ranks(g.cpu().numpy())
            rz -= rz.mean(1, keepdims=True)
            rg -= rg.mean(1, keepdims=True)
            denom = np.sqrt((rz**2).sum(1) * (rg**2).sum(1))
            rho = np.where(denom > 0, (rz * rg).sum(1) / np.where(denom > 0, denom, 1), 0.0)
            chosen = smallest_mask(z, ratio)
            chosen = torch.ones_like(z, dtype=torch.bool) if chosen is None else chosen
            k = max(1, selected_count(ratio, g.shape[1]))
            threshold = g.kthvalue(k, dim=1, keepdim=True).values
            hit = ((g <= threshold) & chosen).sum(1).float() / chosen.sum(1).clamp_min(1)
            acc = sums.setdefault((c.site.kind, c.label), [0.0, 0.0, 0])
            acc[0] += float(rho.sum())
            acc[1] += float(hit.sum())
            acc[2] += len(z)
    return [AgreementRow(name, kind, label, s / n, h / n, ratio) for (kind, label), (s, h, n) in sums.items()]


# ------------------------------------------------------------------------------------- ratio sweep


@dataclass(frozen=True)
class RatioRow(Row):
    """Clean (M passes) and robust accuracy of one selection rule at one ratio."""

    model: str
    kind: str
    std: float
    ratio: float
    rule: str
    clean: float
    clean_std: float
    base: float
    robust: float | None


def uniform_std(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, *, drop: float, seed: int = 0
) -> float:
    """The std at which uniform noise (ratio 1) at every ``kind`` site costs ``drop`` clean accuracy."""
    selective_sites(model, kind)
    base = clean_accuracy(model, x, y, passes=1).mean

    def acc(std: float) -> float:
        with protect(model, Defense({kind: NoiseSpec(std=std)}), seed=seed) as defended:
            return noisy_accuracy(defended, x, y, passes=1)

    return calibrate_std(acc, base, drop)


def ratio_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    kind: str,
    *,
    std: float,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    rules: Sequence[str] = RULES,
    passes: int = 3,
    seed: int = 0,
    loss: str = "margin",
    robust: RobustCheck | None = None,
    name: str | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[RatioRow]:
    """Clean and (with ``robust``) Square robust accuracy of every rule at every ratio.

    Ratios 0 and 1 select nothing / everything whatever the rule, so they are measured once (through
    ``protect``) and reported for every rule.
    """
    selective_sites(model, kind)
    check_stds([std])
    ratios = check_ratios(ratios)
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"unknown selection rule {rule!r}; rules: {', '.join(RULES)}")
    name = name or getattr(model, "name", type(model).__name__)
    base = clean_accuracy(model, x, y, passes=1).mean
    rows = []
    for ratio in ratios:
        shared = ratio in (0.0, 1.0)
        for i, rule in enumerate(rules):
            if shared and i > 0:
                rows.append(replace(rows[-1], rule=rule))
                continue
            if shared or rule == "noncritical-value":
                defense = Defense({kind: NoiseSpec(std=std, ratio=ratio)}, name=f"{kind}-noise")
                with protect(model, defense, seed=seed) as defended:
                    acc = clean_accuracy(defended, x, y, passes=passes)
                rob = robust(model, defense, seed=seed) if robust is not None else None
            else:
                wrapper = SelectiveNoise(model, kind, std=std, ratio=ratio, rule=rule, seed=seed, loss=loss)
                try:
                    acc = clean_accuracy(wrapper, x, y, passes=passes)
                    rob = robust(wrapper, seed=seed) if robust is not None else None
                finally:
                    wrapper.remove()
            rows.append(RatioRow(name, kind, std, ratio, rule, acc.mean, acc.std, base, rob))
            if on_step:
                on_step()
    return rows
