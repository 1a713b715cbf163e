"""PNG plots of the papers' figures: robust accuracy vs queries, and the clean/robust trade-off."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from .paper import Run, _row_order  # noqa: E402
from .stats import clean_interval, wilson_interval  # noqa: E402
from .worst import QUERY_KINDS  # noqa: E402


def _label(run: Run) -> str:
    return run.method + (f" {run.level}" if run.level else "")


def curve_band(run: Run) -> tuple[list[int], list[float], list[float], list[float]]:
    """``run``'s robust-accuracy curve (:meth:`Run.curve`: queries, %) and the 95% Wilson interval (%)
    of every point over the run's images: (queries, accuracy, low, high)."""
    queries, acc = run.curve()
    n = len(run.results)
    bounds = [wilson_interval(round(a * n / 100), n) for a in acc]
    return queries, acc, [100 * low for low, _ in bounds], [100 * high for _, high in bounds]


def _errors(value: float, interval: tuple[float, float]) -> list[list[float]]:
    """Matplotlib's asymmetric error bar of ``value`` for an interval in %."""
    return [[max(0.0, value - interval[0])], [max(0.0, interval[1] - value)]]


def plot_robust_vs_queries(runs: Sequence[Run], path: Path) -> Path | None:
    """One panel per (model, attack, EOT): robust accuracy (%) against counted queries, a line per method
    with its 95% Wilson band over the images.

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
            q, acc, low, high = curve_band(run)
            x = [max(v, 1) for v in q]
            (line,) = ax.step(x, acc, where="post", label=_label(run))
            ax.fill_between(x, low, high, step="post", color=line.get_color(), alpha=0.12, lw=0)
        ax.set_xscale("log")
        ax.set_ylim(-2, 102)
        ax.set_xlabel("queries per image")
        ax.set_ylabel("robust accuracy (%)")
        title = f"{model}: {attack}" + (f" (EOT M={eot})" if eot > 1 else "")
        ax.set_title(f"{title}; bands: 95% Wilson", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class TradeoffPoint:
    """One method on the trade-off plot: clean and robust accuracy (%) with their 95% intervals (%)."""

    model: str
    label: str
    clean: float
    clean_interval: tuple[float, float] | None
    robust: float
    robust_interval: tuple[float, float]


def tradeoff_points(runs: Sequence[Run], attack: str = "square") -> list[TradeoffPoint]:
    """The methods the trade-off plot draws: ``attack`` at each run's largest budget (no EOT), in table
    order; robust interval: Wilson over the images; clean: of the mean over the passes, over the images."""
    points = [r for r in runs if r.attack == attack and r.eot == 1 and r.results and r.clean is not None]
    out = []
    for run in sorted(points, key=lambda r: _row_order((r.model, r.method, r.level))):
        k, n = sum(r.robust_at(run.budget) for r in run.results), len(run.results)
        clean = None
        if run.clean_n:
            low, high = clean_interval(min(1.0, max(0.0, run.clean / 100)), run.clean_n)
            clean = (100 * low, 100 * high)
        low, high = wilson_interval(k, n)
        out.append(
            TradeoffPoint(run.model, _label(run), run.clean, clean, 100 * k / n, (100 * low, 100 * high))
        )
    return out


def plot_tradeoff(
    runs: Sequence[Run],
    path: Path,
    *,
    attack: str = "square",
    pareto: Mapping[str, Sequence[Mapping[str, object]]] | None = None,
) -> Path | None:
    """Clean vs robust accuracy (``attack`` at each run's largest budget), a panel per model, each method
    with its 95% intervals as error bars (robust: Wilson over the images; clean: of the mean over the
    noisy passes, over the images).

    ``pareto`` maps a model to the tuned trials ({"clean", "robust", "front"}) drawn behind the methods.
    """
    points = tradeoff_points(runs, attack)
    models = sorted({p.model for p in points} | set(pareto or {}))
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
        for p in points:
            if p.model != model:
                continue
            xerr = _errors(p.clean, p.clean_interval) if p.clean_interval else None
            yerr = _errors(p.robust, p.robust_interval)
            ax.errorbar(
                p.clean, p.robust, xerr=xerr, yerr=yerr, fmt="D", ms=6, capsize=3, label=p.label, zorder=3
            )
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy under {attack} (%)")
        ax.set_title(f"{model} (error bars: 95% intervals)", fontsize=10)
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
    if not screened:  # every trial infeasible: say so, with their clean accuracy, not empty axes
        from ..tuning.tune import no_feasible_text

        ax.scatter(
            [100 * t.clean for t in infeasible], [0.0] * len(infeasible), marker="x", color="0.45",
            label=f"infeasible trials ({len(infeasible)}): clean accuracy only, no attack run",
        )  # fmt: skip
        ax.set_ylim(-5, 100)
        text = "\n".join(no_feasible_text(d) for d in result.unmet)
        box = {"boxstyle": "round", "facecolor": "white", "edgecolor": "tab:red"}
        ax.text(0.5, 0.6, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
                color="tab:red", bbox=box)  # fmt: skip
        note = f"; all {len(infeasible)} trials infeasible"
    ax.set_title((title + "\n" if title else "") + f"NSGA-II, {len(result.trials)} trials{note}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
