"""Robust accuracy by the attack's decision and by confirmation, side by side in the reports.

After an attack every verified adversarial example is re-checked on N fresh noisy passes; by
confirmation a success counts only if the majority of them misclassify the returned example. Runs with
that data get "conf." columns (tables 1 and 2, worst_case, ``sinai eval``); stores without it print the
old columns only.
"""

from __future__ import annotations

import json

import pytest

from sinai.attacks import ThreatModel
from sinai.evaluation import EvalConfig
from sinai.evaluation.protocol import EvalResult
from sinai.evaluation.store import ImageResult, ResultStore
from sinai.reports.console import eval_table, paper_tables
from sinai.reports.paper import build_tables, load_runs
from sinai.reports.report import make_report
from sinai.reports.stats import wilson_interval

N = 101
ROBUST = (None, None)
WRONG = "W"


def _results(outcomes: list, first: int = 100) -> list[ImageResult]:
    """Per image (success_at, confirm_rate): (None, None) robust, ``WRONG`` misclassified before the attack;
    a success with a rate was re-checked on N fresh passes, one with None predates confirmation."""
    results = []
    for i, o in enumerate(outcomes):
        if o == WRONG:
            results.append(ImageResult(i, first + i, 0, False, None, 0, 0, 0.0))
            continue
        success, rate = o
        results.append(
            ImageResult(
                i, first + i, 0, True, success, 1 if success is None else success, 0, 0.5,
                confirm_rate=rate, confirm_passes=N if rate is not None else 0,
            )
        )  # fmt: skip
    return results


def _add(store, attack: str, outcomes: list, *, method: str = "RND", level: str = "≈1%", budget: int = 10000):
    describe = {"model": "m", "method": method, "level": level}
    config = EvalConfig(attack=attack, threat=ThreatModel("linf", 0.1), budgets=(budget,), describe=describe)
    results = _results(outcomes)
    run = store.run_id(
        config.settings(images=len(results), dataset_indices=[r.dataset_index for r in results])
    )
    store.add_clean(run, [0.9])
    store.add_results(run, results)
    store.finish(run)


# RND Square at 10k on 7 images: image 1 is broken and confirmed (0.9), image 2 broken at 10 queries but
# only 30% of the fresh passes misclassify its example, image 3 broken at 2000 with 20%, image 4 at 2000
# with 80%; image 5 misclassified from the start; 0 and 6 robust.
SQUARE = [ROBUST, (10, 0.9), (10, 0.3), (2000, 0.2), (2000, 0.8), WRONG, ROBUST]
# RND RayS at 1k: breaks image 0 only, a noisy success (40%).
RAYS = [(10, 0.4), ROBUST, ROBUST, ROBUST, ROBUST, WRONG, ROBUST]
# Base Square without confirmation data (an old run): images 1 and 2 broken.
OLD = [ROBUST, (10, None), (500, None), ROBUST, ROBUST, WRONG, ROBUST]


@pytest.fixture()
def folder(tmp_path):
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "square", OLD, method="Base", level="")
        _add(store, "square", SQUARE)
        _add(store, "rays", RAYS, budget=1000)
    return tmp_path


def _cells(table) -> dict:
    return {r: dict(zip(table.columns, c, strict=True)) for r, c in zip(table.rows, table.cells, strict=True)}


def test_runs_know_their_confirmed_robust_accuracy(folder) -> None:
    with ResultStore(folder / "results.sqlite") as store:
        runs = {(r.method, r.attack): r for r in load_runs(store)}
    square, old = runs["RND", "square"], runs["Base", "square"]
    assert square.confirmed and runs["RND", "rays"].confirmed and not old.confirmed
    assert square.robust(1000) == pytest.approx(100 * 4 / 7)  # images 0, 3, 4, 6
    assert square.robust_confirmed(1000) == pytest.approx(100 * 5 / 7)  # + image 2 (30%)
    assert square.robust(10000) == pytest.approx(100 * 2 / 7)  # images 0, 6
    assert square.robust_confirmed(10000) == pytest.approx(100 * 4 / 7)  # + images 2 and 3 (30%, 20%)
    assert square.robust_confirmed(20000) is None
    # Without confirmation data the attack's decision counts.
    assert old.robust_confirmed(10000) == old.robust(10000) == pytest.approx(100 * 4 / 7)


def test_tables_1_and_2_have_a_conf_column_after_each_attack_column(folder) -> None:
    tables = {t.name: t for t in make_report(folder).tables}
    t1, t2 = tables["table1"], tables["table2"]
    assert t1.columns == [
        "Clean",
        "square 1k",
        "square 1k conf.",
        "square 10k",
        "square 10k conf.",
        "Worst case",
    ]
    assert t2.columns == ["Clean", "rays 1k", "rays 1k conf.", "Worst case"]
    rnd = _cells(t1)["m", "RND", "≈1%"]
    assert rnd["square 1k"] == pytest.approx(400 / 7) and rnd["square 1k conf."] == pytest.approx(500 / 7)
    assert rnd["square 10k"] == pytest.approx(100 * 2 / 7)
    assert rnd["square 10k conf."] == pytest.approx(100 * 4 / 7)
    base = _cells(t1)["m", "Base", ""]
    assert base["square 10k"] == pytest.approx(100 * 4 / 7) and base["square 10k conf."] is None  # no data
    rays = _cells(t2)["m", "RND", "≈1%"]
    assert rays["rays 1k"] == pytest.approx(100 * 5 / 7) and rays["rays 1k conf."] == pytest.approx(
        100 * 6 / 7
    )
    for table in (t1, t2):
        assert {c for c in table.columns if c.endswith("conf.")} == table.unranked
        assert not any(table.columns[j].endswith("conf.") for _, j in table.best)  # best: decision only
        assert any(
            note.startswith("conf.: an image broken by the attack counts only if a majority")
            for note in table.notes
        )
        assert any(f"N = {N}" in note and "decision" in note for note in table.notes)
    markdown = t1.markdown()
    assert "square 1k conf." in markdown and "| –" in markdown  # Base's empty conf. cell
    assert "**" not in markdown  # one defended row: nothing to be significantly better than
    j = t1.columns.index("square 1k conf.")
    assert t1.intervals[t1.rows.index(("m", "RND", "≈1%")), j] == pytest.approx(
        tuple(100 * v for v in wilson_interval(5, 7))
    )  # conf. cells carry their interval too
    text = paper_tables([t1])
    assert "square 10k conf." in text and "fresh noisy passes" in text


def test_worst_case_conf_joins_the_runs_by_confirmation(folder) -> None:
    report = make_report(folder)
    wc = next(t for t in report.tables if t.name == "worst_case")
    assert wc.columns == ["Clean", "square", "rays", "Worst case", "Worst case conf.", "gap", "n"]
    rnd = _cells(wc)["m", "RND", "≈1%"]
    # Decision: rays breaks 0, square 1-4, 5 is misclassified: only image 6 survives both. By
    # confirmation images 0 (rays 40%), 2 (30%) and 3 (20%) survive too.
    assert rnd["Worst case"] == pytest.approx(100 / 7) and rnd["Worst case conf."] == pytest.approx(400 / 7)
    assert rnd["n"] == 7 and rnd["gap"] == pytest.approx(100 * 5 / 7 - 100 / 7)  # vs the decision
    i, j = wc.rows.index(("m", "RND", "≈1%")), wc.columns.index("Worst case conf.")
    assert wc.intervals[i, j] == pytest.approx(tuple(100 * v for v in wilson_interval(4, 7)))
    assert wc.intervals[i, wc.columns.index("Worst case")] == pytest.approx(
        tuple(100 * v for v in wilson_interval(1, 7))
    )
    base = wc.rows.index(("m", "Base", ""))
    assert wc.cells[base][j] is None and (base, j) not in wc.intervals  # a row without confirmation data
    assert (i, j) not in wc.best and "Worst case conf." in wc.unranked
    assert any(note.startswith("Worst case conf.: the same join by confirmation") for note in wc.notes)
    assert "57.1 [25.0, 84.2]" in wc.markdown()
    header = (folder / "report" / "worst_case.csv").read_text().splitlines()[0]
    assert "Worst case conf.,Worst case conf. 95% low,Worst case conf. 95% high" in header
    payload = json.loads((folder / "report" / "worst_case.json").read_text())
    row = next(r for r in payload["rows"] if r["method"] == "RND")
    assert (
        row["Worst case conf."] == pytest.approx(400 / 7) and len(row["Worst case conf. 95% interval"]) == 2
    )


def test_a_store_without_confirmation_prints_the_old_columns_only(tmp_path) -> None:
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "square", OLD, method="Base", level="")
        _add(store, "square", OLD)
        _add(store, "rays", [(10, None), *OLD[1:]], budget=1000)
        runs = load_runs(store)
    assert not any(r.confirmed for r in runs)
    tables = {t.name: t for t in build_tables(runs)}
    assert tables["table1"].columns == ["Clean", "square 1k", "square 10k", "Worst case"]
    assert tables["table2"].columns == ["Clean", "rays 1k", "Worst case"]
    assert tables["worst_case"].columns == ["Clean", "square", "rays", "Worst case", "gap", "n"]
    text = paper_tables(tables.values())
    assert "conf." not in text and "fresh noisy passes" not in text


def test_a_confirmed_run_without_successes_fills_its_conf_cell(tmp_path) -> None:
    """Nothing to confirm: both readings are the same number (confirmation data only exists for successes)."""
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "square", SQUARE)
        _add(store, "square", [ROBUST, ROBUST, WRONG], method="SINAI")
        runs = load_runs(store)
    t1 = next(t for t in build_tables(runs) if t.name == "table1")
    sinai = _cells(t1)["m", "SINAI", "≈1%"]
    assert sinai["square 10k"] == sinai["square 10k conf."] == pytest.approx(200 / 3)


def _eval_result(attack: str, outcomes: list, budgets=(1000, 10000)) -> EvalResult:
    config = EvalConfig(attack=attack, budgets=budgets, describe={"model": "m"})
    results = tuple(_results(outcomes))
    return EvalResult(config, {}, (0.9, 0.8), results, 1.0)


def _interval_text(k: int, n: int) -> str:
    low, high = wilson_interval(k, n)
    return f"{100 * k / n:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def test_eval_table_shows_both_readings_with_intervals() -> None:
    text = eval_table("m", _eval_result("square", SQUARE), 0.95)
    lines = text.splitlines()[3:]
    headers = [h.strip() for h in text.splitlines()[0].strip("|").split("|")]
    cells = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    budgets = ["square @1000", "square @1000 conf.", "square @10000", "square @10000 conf."]
    assert headers[5:] == [*budgets, "median queries (broken)"]
    assert cells[5:9] == [
        _interval_text(4, 7),
        _interval_text(5, 7),
        _interval_text(2, 7),
        _interval_text(4, 7),
    ]
    assert cells[7:9] == ["28.6 [8.2, 64.1]", "57.1 [25.0, 84.2]"]
    # Successes: images 1-4 with rates 0.9, 0.3, 0.2, 0.8: two of four confirmed, mean 0.55.
    assert lines[0] == (
        f"confirmation: 2 of 4 verified successes are misclassified by a majority of {N} fresh passes "
        "(mean rate 0.55)"
    )
    assert lines[1].startswith("[low, high]: 95% interval over the 7 images")


def test_eval_table_of_a_white_box_run_has_no_confirmation_line() -> None:
    text = eval_table("m", _eval_result("pgd", SQUARE, budgets=(10000,)), 0.95)
    assert "pgd @10000 conf." in text and "confirmation:" not in text


def test_eval_table_without_confirmation_has_the_decision_columns_only() -> None:
    result = _eval_result("square", OLD)
    text = eval_table("m", result, 0.95)
    headers = [h.strip() for h in text.splitlines()[0].strip("|").split("|")]
    cells = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert len(text.splitlines()) == 4  # the table and the line saying what the intervals are
    assert headers == [
        "model",
        "defense",
        "clean acc %",
        "std over passes",
        "drop %",
        "square @1000",
        "square @10000",
        "median queries (broken)",
    ]
    low, high = wilson_interval(0.85 * 7, 7)  # the mean over the 2 passes, over the 7 images
    assert cells[2:] == [
        f"85.0 [{100 * low:.1f}, {100 * high:.1f}]", "5.00", "10.00",
        _interval_text(4, 7), _interval_text(4, 7), "255",
    ]  # fmt: skip
    clean_only = eval_table("m", _eval_result("none", [WRONG]), 0.95)
    assert "conf." not in clean_only and len(clean_only.splitlines()) == 4
