"""Uncertainty and paired comparisons in the reports (issue 18, part 1).

Every rate carries its 95% Wilson interval; two rows on the same images are compared with the exact
McNemar test on the images where they differ; "best" is bold only when that test says the row is better
than every other defended row; ``sinai report FOLDER --compare A,B`` prints the comparison.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from scipy.stats import binomtest

from sinai.attacks import ThreatModel
from sinai.cli import cli
from sinai.defenses import parse_defense
from sinai.evaluation import EvalConfig
from sinai.evaluation.store import ImageResult, ResultStore
from sinai.reports.compare import compare, parse_pair
from sinai.reports.paper import build_tables, load_runs
from sinai.reports.report import find_stores, make_report
from sinai.reports.stats import (
    clean_interval,
    mcnemar_exact,
    paired,
    paired_difference_interval,
    wilson_interval,
)

LINF = ThreatModel("linf", 0.1)


def _add(
    store: ResultStore,
    outcomes: str,
    *,
    method: str,
    level: str = "≈1%",
    attack: str = "square",
    model: str = "m",
    budgets: tuple[int, ...] = (1000,),
    defense: str = "none",
    clean: tuple[float, ...] = (0.9,),
) -> None:
    """A finished run on images 0, 1, ...: per image "R" robust, "B" broken at query 10, "L" broken at the
    last budget's query, "W" misclassified before the attack."""
    describe = {"model": model, "method": method, "level": level}
    config = EvalConfig(
        attack=attack, threat=LINF, budgets=budgets, describe=describe, defense=parse_defense(defense)
    )
    run = store.run_id(config.settings(images=len(outcomes), dataset_indices=list(range(len(outcomes)))))
    store.add_clean(run, list(clean))
    last = max(budgets)
    success = {"R": None, "B": 10, "L": last, "W": None}
    results = [ImageResult(i, i, 0, o != "W", success[o], last, 0, 0.1) for i, o in enumerate(outcomes)]
    store.add_results(run, results)
    store.finish(run)


def _cells(table) -> dict:
    return {r: dict(zip(table.columns, c, strict=True)) for r, c in zip(table.rows, table.cells, strict=True)}


# ------------------------------------------------------------------------------------------ statistics


def test_exact_mcnemar_is_the_binomial_test_on_the_discordant_images() -> None:
    for only_a, only_b in [(0, 5), (6, 16), (7, 7), (3, 20), (12, 1), (40, 25)]:
        expected = binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert mcnemar_exact(only_a, only_b) == pytest.approx(expected, rel=1e-12)
        assert mcnemar_exact(only_a, only_b) == mcnemar_exact(only_b, only_a)  # two-sided
    assert mcnemar_exact(0, 0) == 1.0  # no discordant image: no evidence either way
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 3)


def test_paired_difference_interval() -> None:
    # Newcombe (1998) method 10 on the paired table of Fagerland, Lydersen & Laake, "Statistical Analysis
    # of Contingency Tables" (2017), ch. 8 (Cavo et al. 2012): 59, 6 / 16, 80 -> -0.0621 (-0.1186, -0.0046).
    low, high = paired_difference_interval(59, 6, 16, 80)
    assert (low, high) == pytest.approx((-0.1186, -0.0046), abs=1e-4)
    for counts in [(10, 0, 0, 10), (0, 30, 0, 0), (5, 3, 9, 2), (40, 12, 2, 6)]:
        low, high = paired_difference_interval(*counts)
        both, only_a, only_b, neither = counts
        d = (only_a - only_b) / sum(counts)
        assert -1 <= low <= d <= high <= 1
    wide = paired_difference_interval(5, 3, 9, 2)
    narrow = paired_difference_interval(50, 30, 90, 20)  # same shares, ten times the images
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    with pytest.raises(ValueError, match="at least one image"):
        paired_difference_interval(0, 0, 0, 0)


def test_paired_counts_only_the_common_images() -> None:
    a = {0: True, 1: True, 2: False, 3: True, 9: True}
    b = {0: True, 1: False, 2: True, 3: False, 7: False}
    test = paired(a, b)
    assert (test.both, test.only_a, test.only_b, test.neither, test.n) == (1, 2, 1, 0, 4)
    assert test.difference == pytest.approx(0.25) and not test.a_better()
    with pytest.raises(ValueError, match="share no image"):
        paired({0: True}, {1: True})


def test_clean_interval_is_the_wilson_interval_of_the_pass_mean() -> None:
    low, high = clean_interval(0.9, 50)
    assert low < 0.9 < high
    assert (low, high) == pytest.approx(wilson_interval(45, 50))
    assert clean_interval(0.9, 5000)[1] - clean_interval(0.9, 5000)[0] < high - low
    with pytest.raises(ValueError, match="fraction"):
        clean_interval(1.5, 10)


# ------------------------------------------------------------------------------------------ best marking


@pytest.fixture()
def folder(tmp_path):
    """40 images. SINAI keeps 30 robust, RND 10 (all inside SINAI's): SINAI is significantly better.
    FND keeps 28: not significantly below SINAI, so the square column marks nothing."""
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "R" * 5 + "B" * 35, method="Base", level="")
        _add(store, "R" * 10 + "B" * 30, method="RND", defense="RND:std=0.05")
        _add(store, "R" * 30 + "B" * 10, method="SINAI", defense="SINAI:relu.std=0.4,relu.ratio=0.5")
        _add(store, "R" * 10 + "B" * 30, method="RND", attack="rays", defense="RND:std=0.05")
        _add(
            store,
            "R" * 30 + "B" * 10,
            method="SINAI",
            attack="rays",
            defense="SINAI:relu.std=0.4,relu.ratio=0.5",
        )
        _add(store, "R" * 28 + "B" * 12, method="FND", attack="rays", defense="FND:std=0.5")
        _add(store, "R" * 28 + "B" * 12, method="FND", defense="FND:std=0.5")
        _add(store, "R" * 40, method="Base", level="", model="other")  # Base alone: never best
    return tmp_path


def test_best_is_marked_only_when_the_paired_test_says_so(folder) -> None:
    with ResultStore(folder / "results.sqlite") as store:
        runs = load_runs(store)
    tables = {t.name: t for t in build_tables(runs)}
    t1 = tables["table1"]
    best = {(t1.rows[i][1], t1.columns[j]) for i, j in t1.best}
    # SINAI 30 vs FND 28: 2 discordant images, far from significant: no bold in the square column.
    assert not any(column == "square 1k" for _, column in best)
    assert "**" not in t1.markdown()
    # Without FND in the table, SINAI 30 vs RND 10 (20 discordant images, p ~ 2e-6) is bold.
    without_fnd = [r for r in runs if r.method != "FND"]
    t1 = next(t for t in build_tables(without_fnd) if t.name == "table1")
    best = {(t1.rows[i][1], t1.columns[j]) for i, j in t1.best}
    assert ("SINAI", "square 1k") in best and ("SINAI", "Worst case") in best
    assert not any(method in ("Base", "RND") for method, _ in best)
    assert ("SINAI", "Clean") not in best  # no per-image data of the clean passes: never bold
    ((i, j),) = [(i, j) for i, j in t1.best if t1.columns[j] == "square 1k"]
    runner_up, p = t1.tests[i, j]
    assert t1.rows[runner_up][1] == "RND" and p == pytest.approx(binomtest(20, 20).pvalue)
    assert "**75.0**" in t1.markdown()
    assert any("exact McNemar" in note for note in t1.notes)


def test_a_tie_and_a_lone_defense_are_never_best(tmp_path) -> None:
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "R" * 30 + "B" * 10, method="RND")
        _add(store, "B" * 10 + "R" * 30, method="FND")  # same rate, other images
        _add(store, "R" * 40, method="SINAI", model="alone")
        runs = load_runs(store)
    t1 = next(t for t in build_tables(runs) if t.name == "table1")
    assert t1.best == []


def test_every_rate_has_an_interval_in_markdown_csv_and_json(folder) -> None:
    report = make_report(folder)
    t1 = next(t for t in report.tables if t.name == "table1")
    rows = _cells(t1)
    i, j = t1.rows.index(("m", "SINAI", "≈1%")), t1.columns.index("square 1k")
    assert rows["m", "SINAI", "≈1%"]["square 1k"] == 75.0
    assert t1.intervals[i, j] == pytest.approx(tuple(100 * v for v in wilson_interval(30, 40)))
    clean = t1.intervals[i, t1.columns.index("Clean")]
    assert clean == pytest.approx(tuple(100 * v for v in clean_interval(0.9, 40)))
    low, high = t1.intervals[i, j]
    assert f"75.0 [{low:.1f}, {high:.1f}]" in t1.markdown()
    header = (folder / "report" / "table1.csv").read_text().splitlines()[0].split(",")
    for column in t1.columns:
        assert header.index(f"{column} 95% low") == header.index(column) + 1
        assert header.index(f"{column} 95% high") == header.index(column) + 2
    payload = json.loads((folder / "report" / "worst_case.json").read_text())
    sinai = next(r for r in payload["rows"] if r["method"] == "SINAI")
    for column in ("Clean", "square", "rays", "Worst case"):
        assert sinai[f"{column} 95% low"] <= sinai[column] <= sinai[f"{column} 95% high"]
    assert payload["interval"].startswith("95% Wilson")


def test_rows_name_their_defense_with_std_and_ratio(folder) -> None:
    report = make_report(folder)
    t1 = next(t for t in report.tables if t.name == "table1")
    defenses = dict(zip([r[1] for r in t1.rows], t1.defenses, strict=True))
    assert defenses["RND"] == "RND(input std=0.05)" and defenses["Base"] == "none"
    assert "std=0.4" in defenses["SINAI"] and "ratio=0.5" in defenses["SINAI"]
    assert "RND(input std=0.05)" in t1.markdown()
    csv_rows = (folder / "report" / "table1.csv").read_text().splitlines()
    assert csv_rows[0].startswith("model,method,level,defense,")
    assert any(",RND(input std=0.05)," in line for line in csv_rows[1:])
    payload = json.loads((folder / "report" / "table1.json").read_text())
    assert {r["method"]: r["defense"] for r in payload["rows"]}["FND"] == "FND(feature std=0.5)"


def test_every_requested_budget_is_a_column(tmp_path) -> None:
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "RLBR", method="RND", budgets=(100, 500, 2000))
        _add(store, "RRBW", method="FND", budgets=(300,))
        runs = load_runs(store)
    t1 = next(t for t in build_tables(runs) if t.name == "table1")
    assert t1.columns == [
        "Clean",
        "square 100",
        "square 300",
        "square 500",
        "square 1k",
        "square 2k",
        "Worst case",
    ]
    fnd = _cells(t1)["m", "FND", "≈1%"]
    assert fnd["square 300"] == 50.0 and fnd["square 500"] is None  # FND stopped at 300 queries
    rnd = _cells(t1)["m", "RND", "≈1%"]
    assert rnd["square 1k"] == 75.0 and rnd["square 2k"] == 50.0  # "L": broken at query 2000


# ------------------------------------------------------------------------------------------ --compare


def test_compare_counts_the_discordant_images(folder) -> None:
    with ResultStore(folder / "results.sqlite") as store:
        runs = load_runs(store)
    comparisons = compare(runs, "SINAI ≈1%", "RND1%")  # the ≈ may be left out
    columns = [c.column for c in comparisons]
    assert columns == ["square @1000", "rays @1000", "Worst case"]
    for c in comparisons:
        assert (c.test.only_a, c.test.only_b, c.test.n) == (20, 0, 40)
        assert c.test.a_better() and c.test.p_value == pytest.approx(binomtest(20, 20).pvalue)
        assert c.row_a == "SINAI ≈1%" and c.row_b == "RND ≈1%"
    close = compare(runs, "SINAI", "FND")  # the method alone where the model has one row of it
    assert all((c.test.only_a, c.test.only_b) == (2, 0) and not c.test.a_better() for c in close)


def test_compare_cli_prints_the_paired_comparison(folder) -> None:
    result = CliRunner().invoke(cli, ["report", str(folder), "--compare", "SINAI ≈1%,FND ≈1%"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "| square @1000" in line)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2:7] == ["40", "75.0", "70.0", "2", "0"]
    low, high = paired_difference_interval(28, 2, 0, 10)
    assert cells[7] == f"+5.0 [{100 * low:+.1f}, {100 * high:+.1f}]"
    assert cells[8] == f"{binomtest(2, 2).pvalue:.3g}" and cells[9] == "no significant difference"
    assert "A = SINAI ≈1%, B = FND ≈1%" in result.output and "McNemar" in result.output
    assert not (folder / "report").exists()  # a comparison writes no files


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("SINAI", "two row names separated by one comma"),
        ("SINAI,RND,FND", "two row names separated by one comma"),
        ("SINAI,sinai", "two different rows"),
        ("SINAI,XYZ", "no attacked row 'XYZ'"),
        ("Base,RND", "no attacked row 'Base and RND in one model'"),
    ],
)
def test_compare_bad_names_are_one_line(tmp_path, pair, message) -> None:
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "RRBB", method="SINAI")
        _add(store, "RBBB", method="RND", model="other")
        _add(store, "RRRB", method="Base", level="", model="third")
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "--compare", pair])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_an_ambiguous_name_lists_the_rows() -> None:
    with pytest.raises(ValueError, match="fits several rows of m: 'RND ≈1%', 'RND ≈2%'"):
        from sinai.reports.compare import _resolve
        from sinai.reports.paper import Run

        runs = [Run("m", "RND", level, "square", 1, 10, 0.9) for level in ("≈1%", "≈2%")]
        _resolve(runs, "RND")
    assert parse_pair(" A , B ") == ("A", "B")


# ------------------------------------------------------------------------------------------ finding stores


def test_report_finds_stores_at_any_depth_through_links(tmp_path) -> None:
    deep = tmp_path / "runs" / "a" / "b" / "c"
    deep.mkdir(parents=True)
    with ResultStore(deep / "results.sqlite") as store:
        _add(store, "RRBB", method="RND")
    other = tmp_path / "elsewhere"
    other.mkdir()
    with ResultStore(other / "results.sqlite") as store:
        _add(store, "RBBB", method="FND")
    os.symlink(other, tmp_path / "runs" / "linked")
    os.symlink(tmp_path / "runs", deep / "loop")  # a link back up: each folder is read once
    found = find_stores(tmp_path / "runs")
    assert [p.parent.name for p in found] == ["c", "linked"]
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    assert "RND ≈1%" in result.output and "FND ≈1%" in result.output
    single = CliRunner().invoke(cli, ["report", str(deep / "results.sqlite")])  # one store file
    assert single.exit_code == 0 and "FND" not in single.output and (deep / "report" / "table1.md").exists()
    garbage = tmp_path / "bad" / "results.sqlite"
    garbage.parent.mkdir()
    garbage.write_text("not a database")
    bad = CliRunner().invoke(cli, ["report", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and str(garbage) in bad.output and "Traceback" not in bad.output
