"""``sinai report DIR``: every table and plot the result store(s) of a run folder can fill."""

from __future__ import annotations

import json
import os
import sqlite3
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
    """Every ``results.sqlite`` under ``folder`` at any depth, through linked folders too (each real
    folder once); ``folder`` may itself be a store file. A tuning folder's screening runs are skipped
    when read."""
    if folder.is_file():
        return [folder]
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []  # a link back into a folder already read
            continue
        seen.add(real)
        dirs.sort()
        if STORE_NAME in files:
            found.append(Path(root) / STORE_NAME)
    return sorted(found)


def read_runs(folder: str | Path) -> tuple[Path, list[Run]]:
    """The runs of every result store under ``folder`` (a folder, searched at any depth, or one
    ``results.sqlite``); a ``ValueError`` naming the path when there is none or a store is unreadable."""
    folder = Path(folder)
    if not folder.exists():
        raise ValueError(f"{folder} is not a folder: give the output folder of an evaluation or a demo")
    if folder.is_file() and folder.suffix not in (".sqlite", ".db"):
        raise ValueError(
            f"{folder} is not a folder or a {STORE_NAME}: give the output folder of an evaluation"
        )
    stores = find_stores(folder)
    if not stores:
        raise ValueError(f"no {STORE_NAME} under {folder} (searched every subfolder): evaluate into it first")
    runs: list[Run] = []
    for path in stores:
        try:
            with ResultStore(path) as store:
                runs += load_runs(store)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{path} is not a readable sinai result store ({err})") from err
    return folder, runs


def tuned_trials(folder: Path) -> dict[str, list[dict]]:
    """Per model, the promoted trials of every tuning run under ``folder`` (clean %, robust %, front)."""
    trials: dict[str, list[dict]] = {}
    for path in sorted(folder.rglob(TUNING_NAME)):
        data = json.loads(path.read_text())
        full = [t for t in data.get("trials", []) if t.get("robust_full") is not None]
        points = [{"clean": 100 * t["clean"], "robust": 100 * t["robust_full"]} for t in full]
        for p, front in zip(points, pareto_mask([(p["clean"], p["robust"]) for p in points]), strict=True):
            p["front"] = front
        if points:  # a study with no feasible trial has nothing to draw (its rows say so)
            trials.setdefault(str(data.get("model") or "model"), []).extend(points)
    return trials


def add_unmet_rows(tables: list[Table], folder: Path) -> None:
    """For every tuning run under ``folder`` (its ``tuning.json``) that found no feasible configuration
    within a delta, a row "no feasible configuration within δ" at the end of each table with rows of its
    model (not seed 001's Table 6), where the tuned row would have been, instead of no row at all."""
    from ..tuning.tune import no_feasible_text

    for path in sorted(folder.rglob(TUNING_NAME)):
        data = json.loads(path.read_text())
        model, method = str(data.get("model") or "model"), str(data.get("method") or "SINAI")
        for key, chosen in sorted((data.get("chosen") or {}).items(), key=lambda kv: float(kv[0])):
            row = (model, method, f"≈{100 * float(key):g}%")  # the level a plan gives a tuned drop
            for table in tables:
                if chosen is not None or table.name == "table6" or row in table.rows:
                    continue
                if any(r[0] == model for r in table.rows):
                    table.rows.append(row)
                    table.cells.append([no_feasible_text(float(key))] + [None] * (len(table.columns) - 1))


def make_report(folder: str | Path, out: str | Path | None = None) -> Report:
    """Read every result store under ``folder`` (:func:`read_runs`); write tables (md/csv/json) and
    PNGs to ``out`` (default ``folder/report``, next to the store when ``folder`` is one)."""
    folder, runs = read_runs(folder)
    if folder.is_file():
        folder = folder.parent
    out = Path(out) if out is not None else folder / "report"
    tables = build_tables(runs)
    add_unmet_rows(tables, folder)
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


def write_tuning(
    result: TuneResult, folder: Path, model_name: str | None, method: str = "SINAI"
) -> list[Path]:
    """``tuning.json`` (every trial, the front, the choices), ``trials.csv`` and ``pareto.png``;
    ``method`` names the tuned rows (the preset tuned)."""
    payload = {"model": model_name, "method": method, **result.as_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TUNING_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["number,clean,drop,robust_screened,robust_full," + ",".join(sorted(result.trials[0].params))]
    for t in result.trials:
        full = "" if t.robust_full is None else f"{t.robust_full:.4f}"
        params = ",".join(f"{t.params[k]:.4f}" for k in sorted(t.params))
        lines.append(f"{t.number},{t.clean:.4f},{t.drop:.4f},{t.robust:.4f},{full},{params}")
    (folder / "trials.csv").write_text("\n".join(lines) + "\n")
    plot_tuning(result, folder / "pareto.png", title=f"{model_name}: {method} tuning")
    return [folder / TUNING_NAME, folder / "trials.csv", folder / "pareto.png"]


def compare_report(folder: str | Path, pair: str) -> str:
    """``sinai report FOLDER --compare A,B``: the paired comparison of rows A and B (:mod:`.compare`)."""
    from .compare import compare, comparison_table, parse_pair

    a, b = parse_pair(pair)
    _folder, runs = read_runs(folder)
    return comparison_table(compare(runs, a, b), a, b)
