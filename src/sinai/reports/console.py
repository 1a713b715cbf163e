"""The tables the commands print: each function returns Markdown text (see :mod:`.table`) for a result.

Numbers are formatted here, once; the command line only echoes the text.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

from .confirm import CONF, confirm_rate, has_confirmation, passes_text, robust_confirmed_at
from .stats import clean_interval, wilson_interval
from .table import markdown_table

if TYPE_CHECKING:
    from ..analysis.common import Row
    from ..analysis.gradnorm import GradStats
    from ..analysis.theory import FlipRate, LayerRow
    from ..evaluation.protocol import EvalResult
    from ..evaluation.store import ImageResult
    from ..tuning.calibrate import Calibration
    from ..tuning.tune import TuneResult
    from .paper import Table


def _defense_label(defense: object) -> str:
    return defense.describe() if defense.specs else "Base"


def eval_table(model_name: str, result: EvalResult, base: float) -> str:
    """One row: clean accuracy (mean over M passes, its 95% interval over the images, the std over the
    passes), its drop from ``base`` (the undefended accuracy), robust accuracy at every budget with its
    95% Wilson interval over the images and the median queries of the broken images; a line under the
    table says what the intervals are.

    When the images carry confirmation data (see :mod:`.confirm`), every budget gets a second column,
    ``<attack> @<budget> conf.``, robust accuracy by confirmation, with its interval too; score and
    decision attacks also get a line saying how many verified successes the fresh passes confirmed."""
    config = result.config
    results = result.results
    n = int(result.settings.get("images") or len(results))
    headers = ["model", "defense", "clean acc %", "std over passes", "drop %"]
    row: list[object] = [
        model_name,
        _defense_label(config.defense),
        _clean_with_interval(result.clean_mean, n),
        f"{100 * result.clean_std:.2f}",
        f"{100 * (base - result.clean_mean):.2f}",
    ]
    lines = []
    if config.attack != "none":
        confirmed = has_confirmation(results)
        for b in config.budgets:
            headers.append(f"{config.attack} @{b}")
            row.append(_rate_with_interval(sum(r.robust_at(b) for r in results), len(results)))
            if confirmed:
                headers.append(f"{config.attack} @{b} {CONF}")
                row.append(_rate_with_interval(sum(robust_confirmed_at(r, b) for r in results), len(results)))
        if confirmed:
            from .worst import QUERY_KINDS, attack_kind  # the attack registry, only when needed

            if attack_kind(config.attack) in QUERY_KINDS:
                lines.append(confirmation_line(results))
        spent = [r.success_at for r in results if r.success_at is not None]
        headers.append("median queries (broken)")
        row.append(int(statistics.median(spent)) if spent else "-")
    passes = len(result.clean)
    lines.append(
        f"[low, high]: 95% interval over the {n} images (Wilson; clean accuracy: of the mean over the "
        f"{passes} noisy pass{'es' if passes != 1 else ''})."
    )
    return "\n".join([markdown_table(headers, [row]), *lines])


def _clean_with_interval(mean: float, n: int) -> str:
    """``91.3 [80.3, 96.5]``: a clean accuracy (mean over passes, %) and its 95% interval over ``n``
    images (:func:`.stats.clean_interval`); the mean alone without images."""
    if not n:
        return f"{100 * mean:.2f}"
    low, high = clean_interval(min(1.0, max(0.0, mean)), n)
    return f"{100 * mean:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _rate_with_interval(successes: int, n: int) -> str:
    """``58.0 [44.2, 70.6]``: the rate (%) and its 95% Wilson interval; ``-`` without images."""
    if not n:
        return "-"
    low, high = wilson_interval(successes, n)
    return f"{100 * successes / n:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def confirmation_line(results: Sequence[ImageResult]) -> str:
    """How many of the verified successes with a confirmation rate a majority of the fresh passes
    misclassify, and their mean rate."""
    rates = [
        rate
        for r in results
        if r.clean_correct and r.success_at is not None and (rate := confirm_rate(r)) is not None
    ]
    confirmed = sum(rate > 0.5 for rate in rates)
    mean = f"{statistics.fmean(rates):.2f}" if rates else "-"
    return (
        f"confirmation: {confirmed} of {len(rates)} verified successes are misclassified by a majority of "
        f"{passes_text(results)} fresh passes (mean rate {mean})"
    )


def snd_metrics(result: EvalResult) -> str | None:
    """SND's metrics of a decision-based attack: attack success rate (with its 95% Wilson interval over
    the correctly classified images) and mean perturbation norm per budget (Table 3) and P_mis (Table 5).

    A score-based or white-box attack gets no table (its queries' norm is the budget eps, it says
    nothing), only the P_mis line when the run measured it; None when there is nothing to print."""
    from .worst import attack_kind  # the attack registry, only when needed

    p_mis = None if result.p_mis is None else f"P_mis {result.p_mis:.4f}"
    decision = result.config.attack != "none" and attack_kind(result.config.attack) == "decision"
    if not decision or not any(r.checkpoint_norms for r in result.results):
        return p_mis
    attacked = [r for r in result.results if r.clean_correct]
    rows = []
    for b in result.config.budgets:
        mean = result.mean_norm(b)
        broken = _rate_with_interval(sum(not r.robust_at(b) for r in attacked), len(attacked))
        rows.append([b, broken, "-" if mean is None else f"{mean:.4f}"])
    text = markdown_table(["queries", "attack success %", f"mean {result.config.threat.norm} norm"], rows)
    return text if p_mis is None else f"{text}\n{p_mis}"


def calibration_table(calibrations: Sequence[tuple[str, Calibration]]) -> str:
    """A row per (defense as asked, calibration): target, std found, drop reached, steps, and the
    defense text that reproduces it."""
    rows = []
    for name, c in calibrations:
        text = c.defense.to_text(digits=4)  # what --defense parses back into this defense, on this model
        rows.append(
            [name, f"{100 * c.target:g}", round(c.std, 4), round(100 * c.drop, 2),
             "yes" if c.reached else "NO", len(c.steps), text]
        )  # fmt: skip
    headers = ["defense", "target %", "std", "drop %", "reached", "steps", "use as --defense"]
    return markdown_table(headers, rows)


def tuning_table(result: TuneResult) -> str:
    """The feasible Pareto front of a tuning run: clean accuracy, drop, screened and full robust accuracy;
    a row "no feasible configuration within δ" for each delta no trial met."""
    from ..tuning.tune import no_feasible_text

    rows: list[list[object]] = [
        [
            t.number,
            t.defense().describe(),
            round(100 * t.clean, 2),
            round(100 * t.drop, 2),
            round(100 * t.robust, 1),
            "-" if t.robust_full is None else round(100 * t.robust_full, 1),
        ]
        for t in result.pareto
    ]
    rows += [["-", no_feasible_text(d), "-", "-", "-", "-"] for d in result.unmet]
    return markdown_table(
        ["trial", "defense", "clean %", "drop %", "robust % (screen)", "robust % (full)"], rows
    )


def paper_tables(tables: Iterable[Table], note: str = "") -> str:
    """Every paper-style table under its name (and ``note``, e.g. the number of images), its own notes
    (the worst-case rule, ...) below it."""
    return "\n".join(f"\n{table.name}{note}:\n{table.text()}" for table in tables)


def bench_defenses_table(rows: Sequence[object]) -> str:
    """Protected / unprotected forward time per model, batch and defense."""
    return markdown_table(
        ["model", "batch", "defense", "sites", "clean ms", "defended ms", "ratio"],
        [
            [
                r.model,
                r.batch,
                r.defense,
                r.sites,
                round(r.clean_ms, 1),
                round(r.defended_ms, 1),
                round(r.ratio, 3),
            ]
            for r in rows
        ],
    )


def bench_attacks_table(rows: Sequence[object]) -> str:
    """Every field of the attack throughput rows, floats to three decimals."""
    return markdown_table(
        list(asdict(rows[0])),
        [[round(v, 3) if isinstance(v, float) else v for v in asdict(r).values()] for r in rows],
    )


def peers_table(rows: Sequence[object], *, norms: bool = False) -> str:
    """Peer tools on the same attack: images, seconds, success rate (and the median norm with ``norms``)."""
    headers = ["tool", "images", "seconds", "success %"] + (["median l2"] if norms else [])
    body = []
    for r in rows:
        row = [r.tool, r.images, round(r.seconds, 2), round(100 * r.success_rate, 1)]
        if norms:
            row.append("-" if r.median_norm is None else round(r.median_norm, 3))
        body.append(row)
    return markdown_table(headers, body)


# ------------------------------------------------------------------------------------------ analyses


def _fmt(value: object) -> object:
    """Floats to three significant digits; ``None`` (not measured) as an empty cell."""
    if value is None:
        return ""
    return f"{value:.3g}" if isinstance(value, float) else value


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def summary_table(summary: Sequence[Row]) -> str:
    """Rows under their CSV columns (``as_dict`` keys), floats to three significant digits."""
    dicts = [r.as_dict() for r in summary]
    headers = list(dicts[0]) if dicts else []
    return markdown_table(headers, [[_fmt(v) for v in d.values()] for d in dicts])


def gradnorm_table(stats: Sequence[GradStats]) -> str:
    """The pooled (all-site) gradient-norm statistics per model and kind."""
    return markdown_table(
        ["model", "kind", "median |dL/dz|", "p95", "zero share"],
        [
            [r.model, r.kind, f"{r.median:.3g}", f"{r.p95:.3g}", round(r.zero_share, 3)]
            for r in stats
            if r.site == "all"
        ],
    )


def theory_table(sweep: Sequence[LayerRow], flips: Sequence[FlipRate], std: float) -> str:
    """Per model and layer: predicted and measured flip rates, gradient norm, robust accuracy at a fixed
    and at the calibrated std, and the median gradient-ratio change."""
    table = []
    for r in sweep:
        sel = [f for f in flips if (f.model, f.layer) == (r.model, r.layer)]
        table.append(
            [
                r.model,
                r.layer,
                f"{sum(f.predicted for f in sel) / len(sel):.3f}",
                f"{sum(f.measured for f in sel) / len(sel):.3f}",
                f"{r.grad_norm_mean:.3g}",
                _pct(r.robust_fixed),
                f"{r.std_calibrated:.3g}",
                _pct(r.robust_calibrated),
                _fmt(r.ratio_change_median),
            ]
        )
    headers = ["model", "layer", "P predicted", "P measured", "mean grad norm", f"robust (std {std:g})"]
    headers += ["std for drop", "robust (calibrated)", "ratio change"]
    return markdown_table(headers, table)
