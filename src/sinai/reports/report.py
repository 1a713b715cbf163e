"""``sinai report DIR``: every table and plot the result store(s) of a run folder can fill."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..evaluation.store import ResultStore
from ..tuning.pareto import pareto_mask
from .paper import Run, Table, build_tables, load_runs
from .plots import plot_robust_vs_queries, plot_tradeoff, plot_tuning

if TYPE_CHECKING:
    from ..tuning.tune import TuneResult

STORE_NAME = "results.sqlite"
TUNING_NAME = "tuning.json"


@dataclass
class Report:
    tables: list[Table]
    files: list[Path] = field(default_factory=list)


def find_stores(folder: Path) -> list[Path]:
    """The result stores under ``folder`` (a tuning folder's screening runs are skipped when read)."""
    return sorted(folder.rglob(STORE_NAME))


def tuned_trials(folder: Path) -> dict[str, list[dict]]:
    """Per model, the promoted trials of every tuning run under ``folder`` (clean %, robust %, front)."""
    trials: dict[str, list[dict]] = {}
    for path in sorted(folder.rglob(TUNING_NAME)):
        data = json.loads(path.read_text())
        full = [t for t in data.get("trials", []) if t.get("robust_full") is not None]
        points = [{"clean": 100 * t["clean"], "robust": 100 * t["robust_full"]} for t in full]
        for p, front in zip(points, pareto_mask([(p["clean"], p["robust"]) for p in points]), strict=True):
            p["front"] = front
        trials.setdefault(str(data.get("model") or "model"), []).extend(points)
    return trials


def make_report(folder: str | Path, out: str | Path | None = None) -> Report:
    """Read every result store under ``folder``; write tables (md/csv/json) and PNGs to ``out``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: give the output folder of an evaluation or a demo")
    stores = find_stores(folder)
    if not stores:
        raise ValueError(f"no {STORE_NAME} under {folder}: evaluate into this folder first")
    runs: list[Run] = []
    for path in stores:
        with ResultStore(path) as store:
            runs += load_runs(store)
    out = Path(out) if out is not None else folder / "report"
    tables = build_tables(runs)
    report = Report(tables)
    for table in tables:
        report.files += table.write(out)
    for path in (
        plot_robust_vs_queries(runs, out / "robust_vs_queries.png"),
        plot_tradeoff(runs, out / "tradeoff.png", pareto=tuned_trials(folder)),
    ):
        if path:
            report.files.append(path)
    return report


def write_tuning(result: TuneResult, folder: Path, model_name: str | None) -> list[Path]:
    """``tuning.json`` (every trial, the front, the choices), ``trials.csv`` and ``pareto.png``."""
    payload = {"model": model_name, **result.as_dict()}
    (folder / TUNING_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["number,clean,drop,robust_screened,robust_full," + ",".join(sorted(result.trials[0].params))]
    for t in result.trials:
        full = "" if t.robust_full is None else f"{t.robust_full:.4f}"
        params = ",".join(f"{t.params[k]:.4f}" for k in sorted(t.params))
        lines.append(f"{t.number},{t.clean:.4f},{t.drop:.4f},{t.robust:.4f},{full},{params}")
    (folder / "trials.csv").write_text("\n".join(lines) + "\n")
    plot_tuning(result, folder / "pareto.png", title=f"{model_name}: SINAI tuning")
    return [folder / TUNING_NAME, folder / "trials.csv", folder / "pareto.png"]
