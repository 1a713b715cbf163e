"""The papers' tables from a result store: rows model x method, columns clean and attack x budget.

- Table 1 (SINAI Table 1 / RFD Table 2): score-based attacks at 1k and 10k queries.
- Table 2 (SINAI Table 2): decision-based attacks, same layout.
- Table 4 (SINAI Table 4 / RFD Table 7): attacks run with EOT (M > 1), columns attack x M x query count.

A run's row is named by the ``method`` and ``level`` it was described with (``sinai demo`` and
``sinai calibrate``/``tune`` write them), else by its defense. Numbers are percentages; robust accuracy
at budget Q comes from the per-image query index of the verified success, so one 10k run fills both
the 1k and the 10k column. Cells the store cannot fill (a run with a smaller budget) stay empty.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..attacks import ATTACKS, attack_class, is_attack
from ..defenses import Defense
from ..evaluation.store import ImageResult, ResultStore
from .table import markdown_table

METHOD_ORDER = ("Base", "RND", "SND", "FND", "SINAI-Attn", "SINAI-FFN", "SINAI")
STANDARD_BUDGETS = (1000, 10000)


@dataclass
class Run:
    """One evaluation read back from the store."""

    model: str
    method: str
    level: str
    attack: str  # registry name, "none" for clean-only runs
    eot: int
    budget: int
    clean: float | None
    results: list[ImageResult] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def robust(self, budget: int) -> float | None:
        """Robust accuracy (%) at ``budget`` queries, None when the run did not go that far."""
        if budget > self.budget or not self.results:
            return None
        return 100 * sum(r.robust_at(budget) for r in self.results) / len(self.results)

    def curve(self) -> tuple[list[int], list[float]]:
        """Robust accuracy (%) after every query count at which it changed: a step function."""
        n = len(self.results)
        broken = sum(not r.clean_correct for r in self.results)
        steps = sorted(r.success_at for r in self.results if r.clean_correct and r.success_at is not None)
        queries, robust = [0], [100 * (n - broken) / n]
        for i, q in enumerate(steps, 1):
            queries.append(q)
            robust.append(100 * (n - broken - i) / n)
        queries.append(self.budget)
        robust.append(robust[-1])
        return queries, robust


def _method(settings: dict) -> tuple[str, str]:
    """The row name of a run: its described method and level, else its defense (Base for none)."""
    method = settings.get("method")
    if method:
        return str(method), str(settings.get("level") or "")
    defense = Defense.from_dict(settings["defense"])
    return ("Base", "") if defense.name == "none" else (defense.describe(), "")


def load_runs(store: ResultStore, *, include_stages: bool = False) -> list[Run]:
    """Every run in ``store`` with its clean accuracy and per-image results (tuning stages skipped)."""
    runs = []
    for run_id, settings, _finished in store.runs():
        if settings.get("stage") and not include_stages:
            continue  # a tuning trial's screening run, not a table row
        method, level = _method(settings)
        clean = store.clean(run_id)
        runs.append(
            Run(
                model=str(settings.get("model") or "model"),
                method=method,
                level=level,
                attack=str(settings["attack"]),
                eot=int(settings["eot"]),
                budget=max(settings["budgets"]),
                clean=100 * statistics.fmean(clean) if clean else None,
                results=store.results(run_id),
                settings=settings,
            )
        )
    return runs


def _row_order(key: tuple[str, str, str]) -> tuple:
    model, method, level = key
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (model, rank, method, level)


@dataclass
class Table:
    """A paper-style table: ``cells[row][column]`` in %, None where the store has no number."""

    name: str
    columns: list[str]
    rows: list[tuple[str, str, str]]  # (model, method, level)
    cells: list[list[float | None]]
    best: list[tuple[int, int]] = field(default_factory=list)  # (row, column) marked best

    def markdown(self) -> str:
        best = set(self.best)
        body = []
        for i, (model, method, level) in enumerate(self.rows):
            values = [
                "–" if v is None else (f"**{v:.1f}**" if (i, j) in best else f"{v:.1f}")
                for j, v in enumerate(self.cells[i])
            ]
            body.append([model, method + (f" {level}" if level else ""), *values])
        return markdown_table(["model", "method", *self.columns], body)

    def write(self, folder: Path) -> list[Path]:
        """``<name>.md``, ``.csv`` and ``.json`` in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        md, csv_path, js = (folder / f"{self.name}.{ext}" for ext in ("md", "csv", "json"))
        md.write_text(self.markdown() + "\n")
        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model", "method", "level", *self.columns])
            for (model, method, level), values in zip(self.rows, self.cells, strict=True):
                writer.writerow([model, method, level, *("" if v is None else f"{v:.2f}" for v in values)])
        payload = {
            "table": self.name,
            "columns": self.columns,
            "rows": [
                {"model": m, "method": me, "level": lv, **dict(zip(self.columns, values, strict=True))}
                for (m, me, lv), values in zip(self.rows, self.cells, strict=True)
            ],
            "best": [{"row": r, "column": self.columns[c]} for r, c in self.best],
        }
        js.write_text(json.dumps(payload, indent=2) + "\n")
        return [md, csv_path, js]


def _mark_best(table: Table) -> None:
    """Per model and column, the highest value among the defended rows (Base is the reference)."""
    for j in range(len(table.columns)):
        for model in {r[0] for r in table.rows}:
            candidates = [
                (table.cells[i][j], i)
                for i, r in enumerate(table.rows)
                if r[0] == model and r[1] != "Base" and table.cells[i][j] is not None
            ]
            if candidates:
                top = max(v for v, _ in candidates)
                table.best += [(i, j) for v, i in candidates if v == top]


def _budgets(runs: Sequence[Run]) -> list[int]:
    largest = max(r.budget for r in runs)
    return sorted({r.budget for r in runs} | {b for b in STANDARD_BUDGETS if b <= largest})


def _is_decision(attack: str) -> bool:
    return is_attack(attack) and attack_class(attack).output == "labels"


def build_tables(runs: Sequence[Run]) -> list[Table]:
    """Table 1 (score attacks), Table 2 (decision attacks) and Table 4 (EOT), those the runs fill."""
    attacked = [r for r in runs if r.attack != "none"]
    groups = {
        "table1": [r for r in attacked if r.eot == 1 and not _is_decision(r.attack)],
        "table2": [r for r in attacked if r.eot == 1 and _is_decision(r.attack)],
    }
    eot_attacks = {r.attack for r in attacked if r.eot > 1}
    groups["table4"] = [r for r in attacked if r.attack in eot_attacks]
    tables = []
    for name, group in groups.items():
        if not group or (name == "table4" and not eot_attacks):
            continue
        keys = sorted({(r.model, r.method, r.level) for r in group}, key=_row_order)
        columns: list[tuple[str, str, int, int]] = [("Clean", "", 1, 0)]  # (label, attack, eot, budget)
        attacks = sorted({r.attack for r in group}, key=lambda a: ATTACKS.index(a) if a in ATTACKS else 99)
        for attack in attacks:
            for eot in sorted({r.eot for r in group if r.attack == attack}):
                mine = [r for r in group if r.attack == attack and r.eot == eot]
                for budget in _budgets(mine):
                    label = (
                        f"{attack} {_k(budget)}" if name != "table4" else f"{attack} M={eot} QC={_k(budget)}"
                    )
                    columns.append((label, attack, eot, budget))
        cells = []
        for key in keys:
            mine = [r for r in group if (r.model, r.method, r.level) == key]
            clean = next((r.clean for r in mine if r.clean is not None), None)
            row: list[float | None] = [clean]
            for _label, attack, eot, budget in columns[1:]:
                run = max(
                    (r for r in mine if r.attack == attack and r.eot == eot and r.budget >= budget),
                    key=lambda r: len(r.results),
                    default=None,
                )
                row.append(run.robust(budget) if run else None)
            cells.append(row)
        table = Table(name, [c[0] for c in columns], keys, cells)
        _mark_best(table)
        tables.append(table)
    return tables


def _k(budget: int) -> str:
    return f"{budget // 1000}k" if budget >= 1000 and budget % 1000 == 0 else str(budget)
