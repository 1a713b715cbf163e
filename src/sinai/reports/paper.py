"""The papers' tables from a result store: rows model x method, columns clean and attack x budget.

- Table 1 (SINAI Table 1 / RFD Table 2): score-based attacks at 1k and 10k queries.
- Table 2 (SINAI Table 2): decision-based attacks, same layout.
- Table 4 (SINAI Table 4 / RFD Table 7): query attacks run with EOT (M > 1), columns attack x M x query
  count.
- ``whitebox`` (seed 001 Table 1; seed 004 Table 1 with its EOT column): white-box attacks, columns
  Clean, PGD-20, FGSM, MI-FGSM, CW (and the median l2 of the perturbations CW found), AutoAttack, then
  AutoAttack-rand, EOT-PGD and any other white-box run; BitOPs per image and their reduction when a row
  is SINAI-selective (:mod:`sinai.analysis.bitops`).
- ``table6`` (seed 001 Table 6): SINAI-selective's ratio and N:M sweep, each row with every attack run on
  it (naive and BPDA side by side), its worst case and BitOPs, beside the same model without the defense.
- ``worst_case``: per row Clean, every attack run on it (score, decision, white-box, transfer; each at
  its largest budget), the worst case (an image is robust only if no attack broke it; 95% Wilson
  interval over its n images, see :mod:`.worst`) and the gap between the best query attack and it.
  Tables 1, 2 and ``whitebox`` carry the same Worst case column, over every attack on the row.

A run's row is named by the ``method`` and ``level`` it was described with (``sinai demo`` and
``sinai calibrate``/``tune`` write them), else by its defense; the ``defense`` column names the defense
as deployed, with every std and ratio. Numbers are percentages; robust accuracy at budget Q comes from
the per-image query index of the verified success, so one 10k run fills both the 1k and the 10k column,
and every budget a run was asked for is a column. Cells the store cannot fill (a run with a smaller
budget) stay empty.

Every accuracy carries its 95% interval (Wilson over the images; clean accuracy: of the mean over the M
noisy passes, see :mod:`.stats`). A cell is marked best (bold) only when an exact McNemar test on the
same images finds its row better than every other defended row of the model in that column (p < 0.05);
a tie, a lone defense and the Clean column (no per-image data of the passes) are never marked.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..attacks import ATTACKS
from ..defenses import Defense
from ..evaluation.store import ImageResult, ResultStore
from .confirm import CONF, conf_note, has_confirmation, robust_confirmed_at
from .stats import ALPHA, clean_interval, paired, wilson_interval
from .table import markdown_table
from .worst import (
    KINDS,
    QUERY_KINDS,
    RULE_NOTE,
    SHORT_RULE_NOTE,
    RowKey,
    Threat,
    WorstCase,
    attack_kind,
    attack_label,
    row_worst_cases,
    threat_key,
    threat_text,
)

METHOD_ORDER = (
    "Base", "PGD-AT", "SINAI-selective", "RND", "SND", "FND", "MFDV", "SINAI-Attn", "SINAI-FFN", "SINAI"
)  # fmt: skip
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

    @property
    def kind(self) -> str:
        """score, decision, white-box or transfer (an unregistered attack counts as score)."""
        return attack_kind(self.attack)

    @property
    def label(self) -> str:
        """The attack's column name (``square``, ``PGD-20``, ``transfer (square from base)``, ...)."""
        args = self.settings.get("attack_args") or {}
        return attack_label(self.attack, args, self.eot, bool(self.settings.get("bpda")))

    def median_norm(self) -> float | None:
        """Median perturbation norm over the images broken within the run's budget (None if none)."""
        norms = [r.norm for r in self.results if r.clean_correct and not r.robust_at(self.budget)]
        return statistics.median(norms) if norms else None

    def robust(self, budget: int) -> float | None:
        """Robust accuracy (%) at ``budget`` queries, None when the run did not go that far."""
        if budget > self.budget or not self.results:
            return None
        return 100 * sum(r.robust_at(budget) for r in self.results) / len(self.results)

    def robust_outcomes(self, budget: int, *, confirmed: bool = False) -> dict[int, bool]:
        """Per image (dataset index): robust at ``budget`` queries (``confirmed``: by confirmation), the
        data of the paired tests between rows."""
        robust: dict[int, bool] = {}
        for r in self.results:
            ok = robust_confirmed_at(r, budget) if confirmed else r.robust_at(budget)
            robust[r.dataset_index] = robust.get(r.dataset_index, True) and ok
        return robust

    @property
    def clean_n(self) -> int:
        """The number of images its clean accuracy is a mean over (0 when unknown)."""
        return int(self.settings.get("images") or len(self.results))

    @property
    def defense_text(self) -> str:
        """The defense as deployed, with every std and ratio (``RND(input std=0.05)``; ``none``)."""
        try:
            defense = Defense.from_dict(self.settings["defense"])
        except (KeyError, TypeError, ValueError):  # a store written by another version
            return "?"
        return defense.describe() if defense.specs else "none"

    @property
    def confirmed(self) -> bool:
        """The run's verified successes got a fresh confirmation (some result has a confirmation rate)."""
        return has_confirmation(self.results)

    def robust_confirmed(self, budget: int) -> float | None:
        """Robust accuracy (%) at ``budget`` queries by confirmation: a verified success counts only when
        the majority of its fresh confirmation passes misclassify the returned example (see
        :mod:`.confirm`); None when the run did not go that far."""
        if budget > self.budget or not self.results:
            return None
        return 100 * sum(robust_confirmed_at(r, budget) for r in self.results) / len(self.results)

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
        results = store.results(run_id)
        if not results and settings["attack"] != "none":
            continue  # an attack run stopped before its first shard finished: nothing to report yet
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
                results=results,
                settings=settings,
            )
        )
    return runs


def _row_order(key: tuple[str, str, str]) -> tuple:
    model, method, level = key
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return (model, rank, method, level)


INTERVAL_NOTE = (
    "[low, high]: 95% Wilson interval over the images (Clean: of the mean over the M noisy passes, over "
    "the same images)."
)
BEST_NOTE = (
    "Bold: the defended row of a model that is significantly better than every other defended row of "
    "that model in the column, on the same images (exact McNemar test on the images where the two rows "
    f"differ, two-sided, p < {ALPHA:g}); a column without bold has no such row. Clean is never bold (no "
    "per-image data of the noisy passes)."
)


@dataclass
class Table:
    """A paper-style table: ``cells[row][column]`` in % (or a count / a norm where ``formats`` says),
    None where the store has no number.

    ``intervals``: (row, column) -> (low, high) %, the 95% interval printed after the cell.
    ``outcomes``: (row, column) -> per image (dataset index) counted or not: the data of the paired test
    that decides ``best``. ``formats``: column -> the format spec of its Markdown cells (default ``.1f``).
    ``unranked``: columns never marked best. ``notes``: lines printed (and written to the ``.md`` file)
    under the table. ``defenses``: per row the defense as deployed, with its std and ratio.
    ``tests``: per best cell, the runner-up row and the p-value of the paired test against it.
    """

    name: str
    columns: list[str]
    rows: list[tuple[str, str, str]]  # (model, method, level)
    cells: list[list[float | str | None]]  # a str: a label cell (seed 001's N:M)
    best: list[tuple[int, int]] = field(default_factory=list)  # (row, column) marked best
    intervals: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    unranked: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    outcomes: dict[tuple[int, int], dict[int, bool]] = field(default_factory=dict)
    defenses: list[str] = field(default_factory=list)
    tests: dict[tuple[int, int], tuple[int, float]] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # per row, the rows it is ranked against (model)

    def defense(self, i: int) -> str:
        return self.defenses[i] if i < len(self.defenses) else ""

    def _cell(self, i: int, j: int, best: set[tuple[int, int]]) -> str:
        v = self.cells[i][j]
        if v is None:
            return "–"
        text = str(v) if isinstance(v, (int, str)) else format(v, self.formats.get(self.columns[j], ".1f"))
        if (i, j) in best:
            text = f"**{text}**"
        if (i, j) in self.intervals:
            low, high = self.intervals[i, j]
            text += f" [{low:.1f}, {high:.1f}]"
        return text

    def markdown(self) -> str:
        best = set(self.best)
        body = []
        for i, (model, method, level) in enumerate(self.rows):
            values = [self._cell(i, j, best) for j in range(len(self.columns))]
            body.append([model, method + (f" {level}" if level else ""), self.defense(i), *values])
        return markdown_table(["model", "method", "defense", *self.columns], body)

    def text(self) -> str:
        """The Markdown table and its notes."""
        return "\n".join([self.markdown(), *self.notes])

    def _interval_columns(self) -> list[int]:
        return sorted({j for _, j in self.intervals})

    def _row_name(self, i: int) -> str:
        _model, method, level = self.rows[i]
        return method + (f" {level}" if level else "")

    def write(self, folder: Path) -> list[Path]:
        """``<name>.md`` (with the notes), ``.csv`` and ``.json`` in ``folder``; every column with an
        interval gets ``<column> 95% low`` / ``95% high`` columns (CSV) and fields (JSON)."""
        folder.mkdir(parents=True, exist_ok=True)
        md, csv_path, js = (folder / f"{self.name}.{ext}" for ext in ("md", "csv", "json"))
        md.write_text(self.markdown() + "\n" + "".join(f"\n{note}\n" for note in self.notes))
        with_ci = self._interval_columns()
        header = []
        for j, column in enumerate(self.columns):
            header.append(column)
            if j in with_ci:
                header += [f"{column} 95% low", f"{column} 95% high"]

        def csv_value(v: float | None, column: str) -> str:
            if v is None:
                return ""
            if isinstance(v, (int, str)):
                return str(v)
            return f"{v:.4f}" if column in self.formats else f"{v:.2f}"

        with csv_path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model", "method", "level", "defense", *header])
            for i, ((model, method, level), values) in enumerate(zip(self.rows, self.cells, strict=True)):
                line = []
                for j, (column, v) in enumerate(zip(self.columns, values, strict=True)):
                    line.append(csv_value(v, column))
                    if j in with_ci:
                        low, high = self.intervals.get((i, j), (None, None))
                        line += ["" if low is None else f"{low:.2f}", "" if high is None else f"{high:.2f}"]
                writer.writerow([model, method, level, self.defense(i), *line])
        rows = []
        for i, ((m, me, lv), values) in enumerate(zip(self.rows, self.cells, strict=True)):
            row = {"model": m, "method": me, "level": lv, "defense": self.defense(i)}
            row.update(zip(self.columns, values, strict=True))
            for j in with_ci:
                if (i, j) in self.intervals:
                    low, high = self.intervals[i, j]
                    row[f"{self.columns[j]} 95% low"], row[f"{self.columns[j]} 95% high"] = low, high
                    row[f"{self.columns[j]} 95% interval"] = [low, high]
            rows.append(row)
        best = []
        for r, c in self.best:
            entry: dict[str, object] = {"row": r, "method": self._row_name(r), "column": self.columns[c]}
            if (r, c) in self.tests:
                runner_up, p = self.tests[r, c]
                entry |= {"runner_up": self._row_name(runner_up), "p_value": p}
            best.append(entry)
        payload = {
            "table": self.name,
            "columns": self.columns,
            "rows": rows,
            "best": best,
            "interval": "95% Wilson over the images",
            "best_rule": f"exact McNemar test against every other defended row, two-sided, p < {ALPHA:g}",
            **({"notes": self.notes} if self.notes else {}),
        }
        js.write_text(json.dumps(payload, indent=2) + "\n")
        return [md, csv_path, js]


def _mark_best(table: Table) -> None:
    """Per model and column, the defended row (Base is the reference) with the highest value, marked
    only when a paired test on the same images says it is better than every other defended row (see
    :data:`BEST_NOTE`); ties and cells without per-image outcomes are never marked."""
    for j in range(len(table.columns)):
        if table.columns[j] in table.unranked:
            continue
        group = table.groups or [r[0] for r in table.rows]
        for model in sorted(set(group)):
            candidates = [
                (table.cells[i][j], i)
                for i, r in enumerate(table.rows)
                if group[i] == model
                and r[1] != "Base"
                and isinstance(table.cells[i][j], (int, float))
                and (i, j) in table.outcomes
            ]
            if len(candidates) < 2:
                continue  # nothing to be better than
            candidates.sort(key=lambda c: -c[0])
            (top, i_top), rest = candidates[0], candidates[1:]
            if rest[0][0] >= top:
                continue  # a tie
            try:
                tests = [(i, paired(table.outcomes[i_top, j], table.outcomes[i, j])) for _, i in rest]
            except ValueError:  # rows on disjoint images: no paired test, no claim
                continue
            if all(t.a_better() for _, t in tests):
                runner_up, test = tests[0]
                table.best.append((i_top, j))
                table.tests[i_top, j] = (runner_up, test.p_value)


def _finish(table: Table) -> Table:
    """Mark the best cells and add the notes on intervals and best marking."""
    _mark_best(table)
    if table.intervals:
        table.notes.append(INTERVAL_NOTE)
    if table.outcomes:
        table.notes.append(BEST_NOTE)
    return table


def _pct(interval: tuple[float, float]) -> tuple[float, float]:
    return 100 * interval[0], 100 * interval[1]


@dataclass
class _Extras:
    """The intervals and per-image outcomes of a table being built, filled cell by cell."""

    intervals: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    outcomes: dict[tuple[int, int], dict[int, bool]] = field(default_factory=dict)

    def run(self, i: int, j: int, run: Run | None, budget: int, *, confirmed: bool = False) -> float | None:
        """``run``'s robust accuracy (%) at ``budget`` (``confirmed``: by confirmation), with its
        interval and outcomes; None without a run that went that far."""
        if run is None or budget > run.budget or not run.results:
            return None
        n = len(run.results)
        k = sum(robust_confirmed_at(r, budget) if confirmed else r.robust_at(budget) for r in run.results)
        self.intervals[i, j] = _pct(wilson_interval(k, n))
        self.outcomes[i, j] = run.robust_outcomes(budget, confirmed=confirmed)
        return 100 * k / n

    def clean(self, i: int, j: int, runs: Sequence[Run]) -> float | None:
        """The first clean accuracy (%) among ``runs``, with its interval over its images."""
        run = next((r for r in runs if r.clean is not None), None)
        if run is None:
            return None
        if run.clean_n:
            self.intervals[i, j] = _pct(clean_interval(min(1.0, max(0.0, run.clean / 100)), run.clean_n))
        return run.clean

    def worst(self, i: int, j: int, wc: WorstCase | None, *, confirmed: bool = False) -> float | None:
        """A worst case (%) with its interval (and, by decision, its outcomes)."""
        if wc is None:
            return None
        interval = wc.interval_confirmed if confirmed else wc.interval
        if interval is not None:
            self.intervals[i, j] = interval
        if not confirmed and wc.n:
            self.outcomes[i, j] = wc.outcomes
        return wc.accuracy_confirmed if confirmed else wc.accuracy

    def of(self, i: int, j: int, wc: WorstCase, run: Run | None) -> float | None:
        """``run``'s robust accuracy (%) on the worst case's images, with its interval and outcomes."""
        if run is None or not wc.n:
            return None
        outcomes = wc.outcomes_of(run)
        self.intervals[i, j] = _pct(wilson_interval(sum(outcomes.values()), wc.n))
        self.outcomes[i, j] = outcomes
        return 100 * sum(outcomes.values()) / wc.n


def _defense_texts(keys: Sequence[RowKey], runs: Sequence[Run]) -> list[str]:
    """Per row, its defense as deployed (several, joined with `` / ``, when its runs differ)."""
    texts = []
    for key in keys:
        found = dict.fromkeys(r.defense_text for r in runs if (r.model, r.method, r.level) == key)
        texts.append(" / ".join(found))
    return texts


WORST = "Worst case"
WORST_CONF = f"{WORST} {CONF}"
WHITEBOX_COLUMNS = ("PGD-20", "FGSM", "MI-FGSM", "CW", "AutoAttack")
"""The white-box table's fixed columns (seed 001 Table 1), shown even where no run fills them."""
WHITEBOX_OPTIONAL = ("AutoAttack-rand", "EOT-PGD")
"""Next columns of the white-box table, shown when a run fills them (then any other white-box run)."""
CW_NORM = "CW median l2"
WHITEBOX_ORDER = ("pgd", "fgsm", "mifgsm", "cw", "autoattack", "eotpgd", "npixel")


def _pick(runs: Sequence[Run]) -> Run | None:
    """The run that fills a cell: the largest budget, then the most images (the first such run)."""
    return max(runs, key=lambda r: (r.budget, len(r.results)), default=None)


def _label_order(runs: Sequence[Run]) -> list[str]:
    """Column labels of ``runs`` by kind (score, decision, white-box, transfer), then registry order
    (white-box: seed 001 Table 1's order), EOT samples and name."""
    order: dict[str, tuple] = {}
    for r in runs:
        kind = KINDS.index(r.kind) if r.kind in KINDS else len(KINDS)
        order_of = WHITEBOX_ORDER if r.kind == "white-box" else ATTACKS
        rank = order_of.index(r.attack) if r.attack in order_of else len(order_of)
        order.setdefault(r.label, (kind, rank, r.eot, r.label))
    return sorted(order, key=order.__getitem__)


def _row_name(key: RowKey) -> str:
    model, method, level = key
    return " ".join(p for p in (model, method, level) if p)


class _Worst:
    """The worst case of every row (see :mod:`.worst`), as a table's cell and the notes that explain it.

    A row attacked under several threat models has one worst case per threat model; a table shows the
    one of the threat model most of its own runs on that row use (ties: in ``threat_text`` order), and
    says so in a note.
    """

    def __init__(self, runs: Sequence[Run]) -> None:
        self.cases = row_worst_cases(runs)

    def case(self, key: RowKey, table_runs: Sequence[Run]) -> WorstCase | None:
        cases = self.cases.get(key, {})
        if len(cases) <= 1:
            return next(iter(cases.values()), None)
        counts = Counter(threat_key(r.settings) for r in table_runs if (r.model, r.method, r.level) == key)
        return cases[max(sorted(cases, key=threat_text), key=lambda t: counts[t])]

    def notes(self, keys: Sequence[RowKey], table_runs: Sequence[Run]) -> list[str]:
        notes = [SHORT_RULE_NOTE]
        for key in keys:
            wc = self.case(key, table_runs)
            cases = self.cases.get(key, {})
            if wc is not None and len(cases) > 1:
                threats = ", ".join(sorted(threat_text(t) for t in cases))
                notes.append(
                    f"{_row_name(key)}: attacked under several threat models ({threats}); Worst case here "
                    f"joins the {threat_text(wc.threat)} runs (worst_case has a row per threat model)."
                )
            if wc is not None and wc.differing:
                notes.append(_differing_note(key, wc))
        return notes


def _differing_note(key: RowKey, wc: WorstCase) -> str:
    sizes = sorted({len(set(r.dataset_index for r in run.results)) for run in wc.runs})
    return (
        f"{_row_name(key)}: its runs attacked different images ({'/'.join(map(str, sizes))}); the worst "
        f"case is over the {wc.n} images all of them attacked."
    )


def build_tables(runs: Sequence[Run]) -> list[Table]:
    """Table 1 (score attacks), Table 2 (decision attacks), the white-box table, Table 4 (EOT) and the
    worst-case table, those the runs fill."""
    attacked = [r for r in runs if r.attack != "none"]
    worst = _Worst(attacked)
    query = [r for r in attacked if r.kind in QUERY_KINDS]
    groups = {
        "table1": [r for r in query if r.eot == 1 and r.kind == "score"],
        "table2": [r for r in query if r.eot == 1 and r.kind == "decision"],
    }
    eot_attacks = {r.attack for r in query if r.eot > 1}
    groups["table4"] = [r for r in query if r.attack in eot_attacks]
    tables = {}
    for name, group in groups.items():
        if not group or (name == "table4" and not eot_attacks):
            continue
        keys = sorted({(r.model, r.method, r.level) for r in group}, key=_row_order)
        # (label, attack, eot, budget, by confirmation): a conf. column follows each attack column of
        # tables 1 and 2 whose runs carry confirmation data.
        columns: list[tuple[str, str, int, int, bool]] = [("Clean", "", 1, 0, False)]
        attacks = sorted({r.attack for r in group}, key=lambda a: ATTACKS.index(a) if a in ATTACKS else 99)
        for attack in attacks:
            for eot in sorted({r.eot for r in group if r.attack == attack}):
                mine = [r for r in group if r.attack == attack and r.eot == eot]
                confirmed = name != "table4" and any(r.confirmed for r in mine)
                for budget in _budgets(mine):
                    label = (
                        f"{attack} {_k(budget)}" if name != "table4" else f"{attack} M={eot} QC={_k(budget)}"
                    )
                    columns.append((label, attack, eot, budget, False))
                    if confirmed:
                        columns.append((f"{label} {CONF}", attack, eot, budget, True))
        cells, extras = [], _Extras()
        for i, key in enumerate(keys):
            mine = [r for r in group if (r.model, r.method, r.level) == key]
            row: list[float | None] = [extras.clean(i, 0, mine)]
            for j, (_label, attack, eot, budget, by_confirmation) in enumerate(columns[1:], 1):
                run = max(
                    (r for r in mine if r.attack == attack and r.eot == eot and r.budget >= budget),
                    key=lambda r: len(r.results),
                    default=None,
                )
                if run is not None and by_confirmation and not _confirmable(run):
                    run = None  # no confirmation data for successes it found: the conf. cell stays empty
                row.append(extras.run(i, j, run, budget, confirmed=by_confirmation))
            if name != "table4":
                row.append(extras.worst(i, len(row), worst.case(key, group)))
            cells.append(row)
        labels = [c[0] for c in columns] + ([WORST] if name != "table4" else [])
        notes = worst.notes(keys, group) if name != "table4" else []
        conf_columns = {c[0] for c in columns if c[4]}
        if conf_columns:
            notes.append(conf_note(r for run in group if run.confirmed for r in run.results))
        table = Table(
            name, labels, keys, cells, unranked=conf_columns, notes=notes, intervals=extras.intervals,
            outcomes=extras.outcomes, defenses=_defense_texts(keys, group),
        )  # fmt: skip
        tables[name] = _finish(table)
    whitebox = _whitebox_table([r for r in attacked if r.kind == "white-box"], worst)
    worst_table = _worst_case_table(attacked, worst)
    selective = _selective_table(runs, worst)
    order = ("table1", "table2", "whitebox", "table6", "table4", "worst_case")
    tables.update({t.name: t for t in (whitebox, selective, worst_table) if t is not None})
    return [tables[name] for name in order if name in tables]


def _confirmable(run: Run) -> bool:
    """A conf. cell can be filled from ``run``: it has confirmation data, or no verified success to
    confirm (then both readings are the same number)."""
    return run.confirmed or not any(r.clean_correct and r.success_at is not None for r in run.results)


def _whitebox_table(runs: Sequence[Run], worst: _Worst) -> Table | None:
    """Seed 001 Table 1: white-box attacks, a missing run an empty cell; CW with its median l2."""
    if not runs:
        return None
    present = _label_order(runs)
    labels = [*WHITEBOX_COLUMNS, *(c for c in WHITEBOX_OPTIONAL if c in present)]
    labels += [c for c in present if c not in labels]
    columns = ["Clean"]
    for label in labels:
        columns.append(label)
        if label == "CW":
            columns.append(CW_NORM)
    columns.append(WORST)
    keys = sorted({(r.model, r.method, r.level) for r in runs}, key=_row_order)
    costs = _row_bitops(keys, runs)
    cells, extras = [], _Extras()
    for i, key in enumerate(keys):
        mine = [r for r in runs if (r.model, r.method, r.level) == key]
        row: list[float | None] = [extras.clean(i, 0, mine)]
        for column in columns[1:-1]:
            if column == CW_NORM:
                cw = _pick([r for r in mine if r.label == "CW"])
                row.append(cw.median_norm() if cw else None)
            else:
                run = _pick([r for r in mine if r.label == column])
                row.append(extras.run(i, len(row), run, run.budget) if run else None)
        row.append(extras.worst(i, len(row), worst.case(key, runs)))
        if costs:
            row += list(costs.get(key) or (None, None))
        cells.append(row)
    notes = [
        "White-box attacks through the deployed (noisy) model, each run at its largest budget; "
        f"{CW_NORM}: median l2 norm of the CW perturbations on the images it broke.",
        *worst.notes(keys, runs),
    ]
    if costs:
        columns += list(BITOPS_COLUMNS)
        notes.append(BITOPS_NOTE)
    formats = {CW_NORM: ".3f", BITOPS_COLUMNS[0]: ".3f"}
    unranked = {CW_NORM, *BITOPS_COLUMNS}
    table = Table(
        "whitebox", columns, keys, cells, formats=formats, unranked=unranked, notes=notes,
        intervals=extras.intervals, outcomes=extras.outcomes, defenses=_defense_texts(keys, runs),
    )  # fmt: skip
    return _finish(table)


BITOPS_COLUMNS = ("BitOPs (G)", "BitOPs -%")
BITOPS_NOTE = (
    "BitOPs (G): per image, MACs x weight bits x activation bits (32 x 32 for the dense float model; "
    "SINAI-selective's approximation at 4-bit weights, see sinai.analysis.bitops); -%: the reduction "
    "against the same model without the defense (seed 001 Table 6)."
)


def _approx_spec(settings: dict):  # -> SelectiveSpec | None
    return Defense.from_dict(settings["defense"]).specs.get("approx")


def _row_bitops(keys: Sequence[RowKey], runs: Sequence[Run]) -> dict[RowKey, tuple[float, float]]:
    """BitOPs (G) and reduction (%) of each row on an embedded model, when some row is SINAI-selective
    (empty otherwise: for noise defenses the count is the dense model's and says nothing)."""
    by_key = {key: next(r for r in runs if (r.model, r.method, r.level) == key) for key in keys}
    if not any(_approx_spec(run.settings) is not None for run in by_key.values()):
        return {}
    from ..analysis.bitops import bitops
    from ..models.embedded import build_embedded, is_embedded

    out = {}
    for key, run in by_key.items():
        network = str(run.settings.get("network") or run.model)  # the demo names rows by their base model
        if not is_embedded(network):
            continue
        try:
            cost = bitops(build_embedded(network), defense=Defense.from_dict(run.settings["defense"]))
        except ValueError:  # a row whose network is unknown here: its cell stays empty
            continue
        out[key] = (cost.total / 1e9, cost.reduction_percent)
    return out


def _selective_table(runs: Sequence[Run], worst: _Worst) -> Table | None:
    """Seed 001 Table 6: rows SINAI-selective at each ratio / N:M (and the same model without the
    defense, r = 0), columns r, N:M, Clean, every attack on those rows (naive and BPDA side by side),
    Worst case with its 95% interval, BitOPs and their reduction."""
    models = {r.model for r in runs if _approx_spec(r.settings) is not None}
    if not models:
        return None
    mine = [r for r in runs if r.model in models]
    keys = sorted({(r.model, r.method, r.level) for r in mine}, key=_row_order)
    specs = {}
    for key in keys:
        run = next(r for r in mine if (r.model, r.method, r.level) == key)
        specs[key] = _approx_spec(run.settings)
    keys.sort(key=lambda k: (k[0], specs[k].ratio if specs[k] is not None else 0.0, _row_order(k)))
    attacked = [r for r in mine if r.attack != "none"]
    labels = _label_order(attacked)
    columns = ["r", "N:M", "Clean", *labels, WORST, *BITOPS_COLUMNS]
    costs = _row_bitops(keys, mine)
    cells, extras = [], _Extras()
    for i, key in enumerate(keys):
        spec = specs[key]
        row_runs = [r for r in mine if (r.model, r.method, r.level) == key]
        row: list = [100 * spec.ratio if spec else 0.0, f"{spec.n}:{spec.m}" if spec and spec.m else None]
        row.append(extras.clean(i, len(row), row_runs))
        for label in labels:
            run = _pick([r for r in row_runs if r.label == label])
            row.append(extras.run(i, len(row), run, run.budget) if run else None)
        row.append(extras.worst(i, len(row), worst.case(key, attacked)))
        row += list(costs.get(key) or (None, None))
        cells.append(row)
    notes = [
        "r: the share (%) of each sample's conv outputs that take the approximation (0: the exact "
        "network); N:M: N of every M channels approximated instead. Deterministic once P is drawn, so no "
        "EOT: naive white-box attacks differentiate the top-k mask and the INT4 rounding as they are, "
        "BPDA ones pass the gradient of the exact convolution (a gain that BPDA removes is gradient "
        "masking).",
        *worst.notes(keys, attacked),
        BITOPS_NOTE,
    ]
    table = Table(
        "table6", columns, keys, cells, intervals=extras.intervals, outcomes=extras.outcomes,
        formats={"r": ".0f", BITOPS_COLUMNS[0]: ".3f"}, unranked={"r", "N:M", *BITOPS_COLUMNS}, notes=notes,
        defenses=_defense_texts(keys, mine),
    )  # fmt: skip
    return _finish(table)


def _worst_case_table(runs: Sequence[Run], worst: _Worst) -> Table | None:
    """Rows model x method (x threat where a row has several): Clean, every attack on the row's common
    images at its largest budget, Worst case [95% Wilson], gap (best query attack - worst case), n."""
    if not worst.cases:
        return None
    rows: list[tuple[RowKey, RowKey, Threat, WorstCase]] = []  # (shown row, row, threat, worst case)
    for key in sorted(worst.cases, key=_row_order):
        cases = worst.cases[key]
        for threat in sorted(cases, key=threat_text):
            model, method, level = key
            shown = key if len(cases) == 1 else (model, method, f"{level} {threat_text(threat)}".strip())
            rows.append((shown, key, threat, cases[threat]))
    labels = _label_order([r for *_, wc in rows for r in wc.runs])
    query_labels = {r.label for *_, wc in rows for r in wc.runs if r.kind in QUERY_KINDS}
    confirmed = any(wc.confirmed for *_, wc in rows)
    columns = ["Clean", *labels, WORST, *([WORST_CONF] if confirmed else []), "gap", "n"]
    cells, extras = [], _Extras()
    for i, (_shown, key, _threat, wc) in enumerate(rows):
        row_runs = [r for r in runs if (r.model, r.method, r.level) == key]
        row: list[float | int | None] = [extras.clean(i, 0, row_runs)]
        for label in labels:
            run = _pick([r for r in wc.runs if r.label == label])
            row.append(extras.of(i, len(row), wc, run))
        best = [v for c, v in zip(labels, row[1:], strict=True) if c in query_labels and v is not None]
        accuracy = extras.worst(i, len(row), wc)
        row.append(accuracy)
        if confirmed:
            row.append(extras.worst(i, len(row), wc, confirmed=True))
        row += [max(best) - accuracy if best and accuracy is not None else None, wc.n]
        cells.append(row)
    notes = [
        RULE_NOTE,
        "Attack columns: each attack's robust accuracy (%) at its run's largest budget on the same images "
        "as the worst case (the best-sized run where a row has several of one attack), each with its 95% "
        "Wilson interval over n images, as Worst case; gap = the best query-attack (score / decision) column "
        "minus Worst case.",
    ]
    if confirmed:
        joined = [r for *_, wc in rows for run in wc.runs for r in run.results]
        notes.append(
            f"{WORST_CONF}: the same join by confirmation, with its 95% Wilson interval (empty for a row "
            f"without confirmation data); {conf_note(joined)}"
        )
    for _shown, key, _threat, wc in rows:
        if wc.differing:
            notes.append(_differing_note(key, wc))
    table = Table(
        "worst_case", columns, [r[0] for r in rows], cells, intervals=extras.intervals,
        outcomes=extras.outcomes, unranked={"gap", "n", WORST_CONF}, notes=notes,
        defenses=[" / ".join(dict.fromkeys(r.defense_text for r in wc.runs)) for *_, wc in rows],
        groups=[f"{key[0]} {threat_text(threat)}" for _, key, threat, _ in rows],
    )  # fmt: skip
    return _finish(table)


def _budgets(runs: Sequence[Run]) -> list[int]:
    """Every budget the runs were asked for, and the papers' 1k / 10k up to the largest."""
    largest = max(r.budget for r in runs)
    requested = {int(b) for r in runs for b in (r.settings.get("budgets") or [r.budget])}
    return sorted({r.budget for r in runs} | requested | {b for b in STANDARD_BUDGETS if b <= largest})


def _k(budget: int) -> str:
    return f"{budget // 1000}k" if budget >= 1000 and budget % 1000 == 0 else str(budget)
