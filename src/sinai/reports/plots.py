"""PNG plots of the papers' figures: robust accuracy vs queries, and the clean/robust trade-off."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from .paper import Run, _row_order  # noqa: E402
from .worst import QUERY_KINDS  # noqa: E402


def _label(run: Run) -> str:
    return run.method + (f" {run.level}" if run.level else "")


def plot_robust_vs_queries(runs: Sequence[Run], path: Path) -> Path | None:
    """One panel per (model, attack, EOT): robust accuracy (%) against counted queries, a line per method.

    Query attacks only: a white-box or transfer run spends one counted (judging) query per image.
    """
    shown = [r for r in runs if r.attack != "none" and r.results and r.kind in QUERY_KINDS]
    panels = sorted({(r.model, r.attack, r.eot) for r in shown})
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (model, attack, eot) in zip(axes.flat, panels, strict=False):
        mine = sorted(
            (r for r in shown if (r.model, r.attack, r.eot) == (model, attack, eot)),
            key=lambda r: _row_order((r.model, r.method, r.level)),
        )
        for run in mine:
            q, acc = run.curve()
            ax.step([max(v, 1) for v in q], acc, where="post", label=_label(run))
        ax.set_xscale("log")
        ax.set_ylim(-2, 102)
        ax.set_xlabel("queries per image")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(f"{model}: {attack}" + (f" (EOT M={eot})" if eot > 1 else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tradeoff(
    runs: Sequence[Run],
    path: Path,
    *,
    attack: str = "square",
    pareto: Mapping[str, Sequence[Mapping[str, object]]] | None = None,
) -> Path | None:
    """Clean vs robust accuracy (``attack`` at each run's largest budget), a panel per model.

    ``pareto`` maps a model to the tuned trials ({"clean", "robust", "front"}) drawn behind the methods.
    """
    points = [r for r in runs if r.attack == attack and r.eot == 1 and r.results and r.clean is not None]
    models = sorted({r.model for r in points} | set(pareto or {}))
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes.flat, models, strict=True):
        trials = (pareto or {}).get(model, [])
        if trials:
            ax.scatter(
                [t["clean"] for t in trials], [t["robust"] for t in trials],
                s=14, color="0.7", label="tuned trials (validation images)",
            )  # fmt: skip
            front = sorted((t for t in trials if t.get("front")), key=lambda t: t["clean"])
            if front:
                ax.plot(
                    [t["clean"] for t in front], [t["robust"] for t in front],
                    "-o", color="0.35", ms=4, lw=1, label="their Pareto front",
                )  # fmt: skip
        for run in sorted(points, key=lambda r: _row_order((r.model, r.method, r.level))):
            if run.model != model:
                continue
            ax.scatter(run.clean, run.robust(run.budget), s=50, marker="D", label=_label(run), zorder=3)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy under {attack} (%)")
        ax.set_title(model, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_tuning(result: object, path: Path, *, title: str = "") -> Path:
    """A tuning run: every feasible trial (screened), the front, promoted trials' full-protocol robust
    accuracy, the chosen configuration per delta and the clean-accuracy bounds."""
    from ..tuning.tune import TuneResult

    assert isinstance(result, TuneResult)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    screened = [t for t in result.trials if not math.isnan(t.robust)]
    infeasible = [t for t in result.trials if math.isnan(t.robust)]
    ax.scatter(
        [100 * t.clean for t in screened], [100 * t.robust for t in screened],
        s=16, color="0.6", label=f"feasible trials, screened ({len(screened)})",
    )  # fmt: skip
    front = sorted(result.pareto, key=lambda t: t.clean)
    if front:
        ax.plot(
            [100 * t.clean for t in front], [100 * t.robust for t in front],
            "-", color="0.4", lw=1, label="Pareto front (screened)",
        )  # fmt: skip
    full = [t for t in result.trials if t.robust_full is not None]
    ax.scatter(
        [100 * t.clean for t in full], [100 * t.robust_full for t in full],
        s=30, color="tab:orange", label="promoted, full protocol",
    )  # fmt: skip
    labels: dict[int, list[str]] = {}
    for delta, t in result.chosen.items():
        ax.axvline(100 * (result.base - delta), color="tab:red", ls=":", lw=1)
        if t is not None:
            labels.setdefault(t.number, []).append(f"δ={100 * delta:g}%")
    for t in result.trials:
        if t.number in labels:
            ax.scatter(100 * t.clean, 100 * t.robust_full, s=160, marker="*", color="tab:red", zorder=4)
            ax.annotate(", ".join(labels[t.number]), (100 * t.clean, 100 * t.robust_full), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.axvline(100 * result.base, color="k", lw=1, label=f"undefended ({100 * result.base:.1f}%)")
    ax.set_xlabel("clean accuracy (%, mean of M noisy passes)")
    ax.set_ylabel("robust accuracy under Square (%)")
    note = f"; {len(infeasible)} infeasible trials not shown" if infeasible else ""
    ax.set_title((title + "\n" if title else "") + f"NSGA-II, {len(result.trials)} trials{note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
