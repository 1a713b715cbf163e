"""PNG figures for the analyses (matplotlib, Agg backend): one function per figure, rows in, path out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from .common import Row
    from .gradnorm import AgreementRow, RatioRow
    from .sensitivity import SensitivityRow
    from .theory import FlipRate, GradientRatio, LayerRow

KIND_LABELS = {
    "attn": "attention logits (pre-softmax)",
    "gelu": "pre-GeLU",
    "relu": "pre-ReLU",
    "input": "input (RND)",
    "feature": "penultimate features (FND)",
}


def _models(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.model for r in rows))


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _symlog_std(ax: plt.Axes, stds: Sequence[float]) -> None:
    positive = [s for s in stds if s > 0]
    if positive:
        ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlim(-0.3 * min(positive), max(positive) * 1.3)
    ax.set_xlabel("noise std")


def sensitivity_clean(rows: Sequence[SensitivityRow], path: Path) -> Path:
    """SINAI Fig. 1(a)(b): clean accuracy vs std, one line per site kind, one panel per model."""
    models = _models(rows)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sel = [r for r in rows if r.model == model]
        for kind in dict.fromkeys(r.kind for r in sel):
            pts = sorted((r.std, 100 * r.clean) for r in sel if r.kind == kind)
            ax.plot(*zip(*pts, strict=True), marker="o", label=KIND_LABELS.get(kind, kind))
        base = 100 * sel[0].base
        ax.axhline(base - 1, color="grey", ls=":", lw=1, label="1% below undefended")
        _symlog_std(ax, [r.std for r in sel])
        ax.set_ylabel("clean accuracy (%)")
        ax.set_title(f"{model}: noise at one site kind")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def sensitivity_mse(rows: Sequence[SensitivityRow], path: Path) -> Path:
    """SINAI Fig. 1(c): MSE at a middle layer's output (solid) and at the logits (dashed) vs std."""
    models = _models(rows)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sel = [r for r in rows if r.model == model]
        for i, kind in enumerate(dict.fromkeys(r.kind for r in sel)):
            pts = sorted((r.std, r.mse_mid, r.mse_logits) for r in sel if r.kind == kind and r.std > 0)
            if not pts:
                continue
            s, mid, logit = zip(*pts, strict=True)
            color = f"C{i}"
            if any(v > 0 for v in mid):
                ax.plot(
                    s,
                    mid,
                    marker="o",
                    color=color,
                    label=f"{KIND_LABELS.get(kind, kind)} @ {sel[0].layer}",
                )
            ax.plot(
                s, logit, ls="--", marker="x", color=color, label=f"{KIND_LABELS.get(kind, kind)} @ logits"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("noise std")
        ax.set_ylabel("mean squared error vs clean")
        ax.set_title(f"{model}: error caused by the noise")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
        ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def sensitivity_robust(rows: Sequence[SensitivityRow], path: Path, budget: int) -> Path:
    """SINAI Fig. 3: clean and Square robust accuracy vs std per site kind (a row of panels per model)."""
    models = _models(rows)
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models, strict=True):
        sel = [r for r in rows if r.model == model]
        for kind in dict.fromkeys(r.kind for r in sel):
            pts = sorted((r.std, 100 * r.clean, r.robust) for r in sel if r.kind == kind)
            s, clean, rob = zip(*pts, strict=True)
            label = KIND_LABELS.get(kind, kind)
            row_axes[0].plot(s, clean, marker="o", label=label)
            ok = [(a, 100 * b) for a, b in zip(s, rob, strict=True) if b is not None]
            if ok:
                row_axes[1].plot(*zip(*ok, strict=True), marker="o", label=label)
        for ax, what in zip(
            row_axes, ("clean accuracy (%)", f"robust accuracy, Square @{budget} (%)"), strict=True
        ):
            _symlog_std(ax, [r.std for r in sel])
            ax.set_ylabel(what)
            ax.set_title(f"{model}: {what.split(' (')[0]}")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    return _save(fig, path)


def gradnorm_hist(pooled: Mapping[tuple[str, str], np.ndarray], path: Path) -> Path:
    """SINAI Fig. 2(a): histogram of per-logit ``|dL/dz|`` per (model, kind), with median and p95."""
    fig, axes = plt.subplots(1, len(pooled), figsize=(5.5 * len(pooled), 4), squeeze=False)
    for ax, ((model, kind), values) in zip(axes[0], pooled.items(), strict=True):
        nonzero = values[values > 0]
        if nonzero.size:
            bins = np.logspace(np.log10(nonzero.min()), np.log10(nonzero.max()) + 1e-9, 60)
            ax.hist(nonzero, bins=bins, weights=np.full(nonzero.size, 1 / values.size), color="C0", alpha=0.8)
            ax.set_xscale("log")
        med, p95 = np.median(values), np.percentile(values, 95)
        for v, name, color in ((med, "median", "C1"), (p95, "95th pct", "C3")):
            if v > 0:
                ax.axvline(v, color=color, ls="--", label=f"{name} {v:.2e}")
            else:  # cannot be drawn on the log axis: say it in the legend
                ax.plot([], [], " ", label=f"{name} 0")
        zero = float((values == 0).mean())
        ax.set_title(f"{model}: |dL/dz| before {kind.replace('gelu', 'GeLU').replace('relu', 'ReLU')}")
        ax.set_xlabel("per-logit gradient norm (log scale; zeros not shown)")
        ax.set_ylabel("share of logits")
        ax.legend(fontsize=8, title=f"{100 * zero:.0f}% exactly zero", title_fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


RULE_STYLE = {
    "noncritical-value": ("C0", "-", "non-critical-first (value proxy)"),
    "critical-value": ("C3", "-", "critical-first (value proxy)"),
    "noncritical-grad": ("C0", "--", "non-critical-first (gradient)"),
    "critical-grad": ("C3", "--", "critical-first (gradient)"),
}


def ratio_sweep(rows: Sequence[RatioRow], path: Path, budget: int) -> Path:
    """SINAI Fig. 2(b)(c) and 4: clean and robust accuracy vs injection ratio, per selection rule."""
    groups = list(dict.fromkeys((r.model, r.kind) for r in rows))
    has_robust = any(r.robust is not None for r in rows)
    cols = 2 if has_robust else 1
    fig, axes = plt.subplots(len(groups), cols, figsize=(5.5 * cols, 4 * len(groups)), squeeze=False)
    for row_axes, (model, kind) in zip(axes, groups, strict=True):
        sel = [r for r in rows if (r.model, r.kind) == (model, kind)]
        for rule in dict.fromkeys(r.rule for r in sel):
            color, ls, label = RULE_STYLE.get(rule, ("k", "-", rule))
            pts = sorted((r.ratio, 100 * r.clean, r.robust) for r in sel if r.rule == rule)
            ratio, clean, rob = zip(*pts, strict=True)
            row_axes[0].plot(ratio, clean, color=color, ls=ls, marker="o", label=label)
            if has_robust:
                row_axes[1].plot(ratio, [100 * v for v in rob], color=color, ls=ls, marker="o", label=label)
        name = kind.replace("gelu", "pre-GeLU").replace("relu", "pre-ReLU")
        titles = ("clean accuracy (%)", f"robust accuracy, Square @{budget} (%)")[:cols]
        for ax, what in zip(row_axes, titles, strict=True):
            ax.set_xlabel("injection ratio (share of logits with noise)")
            ax.set_ylabel(what)
            ax.set_title(f"{model} {name}, std {sel[0].std:.3g}")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    return _save(fig, path)


def rank_agreement(rows: Sequence[AgreementRow], path: Path) -> Path:
    """Spearman correlation between the value proxy and ``|dL/dz|`` per site, and the proxy's precision."""
    labels = [f"{r.model}\n{r.site}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
    ax.bar(x - 0.2, [r.spearman for r in rows], 0.4, label="Spearman(value, |dL/dz|) per sample")
    ax.bar(
        x + 0.2,
        [r.precision for r in rows],
        0.4,
        label=f"precision of the proxy @ ratio {rows[0].ratio:g}",
    )
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("agreement")
    ax.set_title("Does the value proxy rank logits like the gradient norm?")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def theory_ratios(rows: Sequence[GradientRatio], path: Path) -> Path:
    """RFD Fig. 1: ``||grad_h L||^2 / ||grad_x L||^2`` per layer, clean vs after one adversarial step."""
    models = _models(rows)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sel = [r for r in rows if r.model == model and r.layer != "input"]
        layers = list(dict.fromkeys(r.layer for r in sel))
        pos = np.arange(len(layers))
        for offset, key, color, label in (
            (-0.2, "ratio_clean", "C0", "clean"),
            (0.2, "ratio_adv", "C3", "after one step"),
        ):
            data = [
                [getattr(r, key) for r in sel if r.layer == layer and 0 < getattr(r, key) < np.inf]
                for layer in layers
            ]
            parts = ax.boxplot(data, positions=pos + offset, widths=0.35, patch_artist=True, showfliers=False)
            for box in parts["boxes"]:
                box.set_facecolor(color)
                box.set_alpha(0.5)
            ax.plot([], [], color=color, lw=6, alpha=0.5, label=label)
        ax.set_xticks(
            pos, [layer.removeprefix("net.") for layer in layers], rotation=30, ha="right", fontsize=8
        )
        ax.set_yscale("log")
        ax.set_ylabel("||grad_h L||^2 / ||grad_x L||^2")
        ax.set_title(f"{model}: gradient-norm ratio per layer")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def theory_flips(rows: Sequence[FlipRate], path: Path) -> Path:
    """Theorem 1's predicted probability of a wrong decision vs the measured flip rate, per layer."""
    groups = list(dict.fromkeys((r.model, r.probe_std) for r in rows))
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.5), squeeze=False)
    for ax, (model, probe) in zip(axes[0], groups, strict=True):
        sel = [r for r in rows if (r.model, r.probe_std) == (model, probe)]
        for i, layer in enumerate(dict.fromkeys(r.layer for r in sel)):
            pts = [(r.predicted, r.measured) for r in sel if r.layer == layer]
            p, m = np.array(pts).T
            ax.scatter(p, m, s=8, alpha=0.35, color=f"C{i % 10}")
            ax.scatter([p.mean()], [m.mean()], s=90, marker="*", edgecolor="k", color=f"C{i % 10}",
                       label=f"{layer.removeprefix('net.')}: {p.mean():.3f} vs {m.mean():.3f}")  # fmt: skip
        ax.plot([0, 0.5], [0, 0.5], color="k", lw=0.8, ls="--", label="prediction = measurement")
        ax.set_xlim(0, 0.52)
        ax.set_ylim(0, 0.75)
        ax.set_xlabel("predicted P(wrong decision), Theorem 1")
        ax.set_ylabel("measured flip rate")
        ax.set_title(f"{model}: std {sel[0].std:g}, probe std {probe:g}")
        ax.legend(fontsize=7, title="per image; star = mean", title_fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def theory_layers(rows: Sequence[LayerRow], path: Path, budget: int) -> Path:
    """RFD Tables 6 / 14 as a figure: robust accuracy per noised layer (fixed and calibrated std) and the
    mean gradient norm at that layer."""
    models = _models(rows)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        sel = [r for r in rows if r.model == model]
        pos = np.arange(len(sel))
        for offset, key, label in (
            (-0.2, "fixed", "fixed std"),
            (0.2, "calibrated", "std for the clean drop"),
        ):
            vals = [getattr(r, f"robust_{key}") for r in sel]
            vals = [np.nan if v is None else 100 * v for v in vals]
            ax.bar(pos + offset, vals, 0.4, label=f"robust @{budget}, {label}")
        ax.set_xticks(pos, [r.layer.removeprefix("net.") for r in sel], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(0, 135)  # room for the legend above the bars
        ax.set_yticks(range(0, 101, 20))
        twin = ax.twinx()
        twin.plot(pos, [r.grad_norm_mean for r in sel], color="k", marker="o", label="mean ||grad_h L||")
        twin.set_ylabel("mean ||grad_h L|| (clean)")
        twin.set_yscale("log")
        ax.set_title(f"{model}: noise at one layer")
        lines = ax.get_legend_handles_labels()
        more = twin.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper right")
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
