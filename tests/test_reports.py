"""Report tables hold exactly the rows and columns of the runs in the store; files and plots are written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sinai.cli import cli
from sinai.evaluation import EvalConfig
from sinai.evaluation.store import ImageResult, ResultStore
from sinai.reports.report import make_report


def _add_run(store, *, model, method, level, attack, budget, clean, success_at, eot=1, stage=None) -> None:
    describe = {"model": model, "method": method, "level": level, **({"stage": stage} if stage else {})}
    config = EvalConfig(attack=attack, budgets=(budget,), eot=eot, describe=describe)
    run = store.run_id(config.settings(images=len(success_at), dataset_indices=list(range(len(success_at)))))
    store.add_clean(run, clean)
    results = [
        ImageResult(i, i, 0, s != "wrong", None if s in (None, "wrong") else s, budget, 0, 0.1)
        for i, s in enumerate(success_at)
    ]
    store.add_results(run, results)
    store.finish(run)


@pytest.fixture()
def folder(tmp_path):
    with ResultStore(tmp_path / "results.sqlite") as store:
        # 4 images each: success_at None = robust, "wrong" = misclassified before the attack.
        _add_run(store, model="m", method="Base", level="", attack="Square", budget=10000,
                 clean=[1.0], success_at=[5, 50, 500, 5000])  # fmt: skip
        _add_run(store, model="m", method="RND", level="≈1%", attack="Square", budget=10000,
                 clean=[0.99, 0.98], success_at=[None, 2000, None, "wrong"])  # fmt: skip
        _add_run(store, model="m", method="SINAI", level="≈1%", attack="Square", budget=10000,
                 clean=[0.99, 0.99], success_at=[None, None, 900, 20000 - 10001])  # fmt: skip
        _add_run(store, model="m", method="SINAI", level="≈1%", attack="SignHunter", budget=1000,
                 clean=[0.99, 0.99], success_at=[None, None, None, 10])  # fmt: skip
        _add_run(store, model="m", method="RND", level="≈1%", attack="Square", budget=5000, eot=5,
                 clean=[0.99, 0.98], success_at=[None, 1200, None, None])  # fmt: skip
        _add_run(store, model="m", method="SINAI", level="trial", attack="Square", budget=200,
                 clean=[0.5], success_at=[1, 1, 1, 1], stage="screen")  # fmt: skip
    return tmp_path


def test_table_rows_and_columns_are_exactly_the_runs(folder) -> None:
    report = make_report(folder)
    tables = {t.name: t for t in report.tables}
    assert set(tables) == {"table1", "table4", "worst_case"}  # no decision-based runs -> no table2
    t1 = tables["table1"]
    assert t1.rows == [
        ("m", "Base", ""),
        ("m", "RND", "≈1%"),
        ("m", "SINAI", "≈1%"),
    ]  # the screen run is not a row
    assert t1.columns == ["Clean", "square 1k", "square 10k", "signhunter 1k", "Worst case"]
    cells = {r: dict(zip(t1.columns, c, strict=True)) for r, c in zip(t1.rows, t1.cells, strict=True)}
    assert cells[("m", "Base", "")] == {
        "Clean": 100.0,
        "square 1k": 25.0,
        "square 10k": 0.0,
        "signhunter 1k": None,
        "Worst case": 0.0,  # one attack on the row: the worst case is that attack at its largest budget
    }
    rnd = cells[("m", "RND", "≈1%")]
    assert rnd["Clean"] == pytest.approx(98.5) and rnd["square 1k"] == 75.0 and rnd["square 10k"] == 50.0
    sinai = cells[("m", "SINAI", "≈1%")]
    assert sinai["square 1k"] == 75.0 and sinai["square 10k"] == 50.0 and sinai["signhunter 1k"] == 75.0
    # Worst case over every run on the row, the EOT run (table 4) included: RND keeps images 0 and 2
    # (Square 10k) and 0, 2, 3 (EOT Square); SINAI 0 and 1 (Square) and 0, 1, 2 (SignHunter).
    assert rnd["Worst case"] == 50.0 and sinai["Worst case"] == 50.0
    # 4 images: no paired test can tell the defenses apart, so nothing is marked best (a tie never is).
    assert t1.best == [] and "**" not in t1.markdown()
    # Every rate carries its 95% interval; every row names its defense.
    assert {t1.columns[j] for _, j in t1.intervals} == set(t1.columns)
    assert t1.defenses == ["none", "none", "none"]  # these test runs have no noise

    t4 = tables["table4"]
    assert t4.columns == [
        "Clean",
        "square M=1 QC=1k",
        "square M=1 QC=10k",
        "square M=5 QC=1k",
        "square M=5 QC=5k",
    ]
    rnd4 = dict(zip(t4.columns, t4.cells[t4.rows.index(("m", "RND", "≈1%"))], strict=True))
    assert rnd4["square M=5 QC=1k"] == 100.0 and rnd4["square M=5 QC=5k"] == 75.0


def test_report_writes_tables_and_plots(folder) -> None:
    report = make_report(folder)
    names = {p.name for p in report.files}
    assert {
        "table1.md",
        "table1.csv",
        "table1.json",
        "table4.md",
        "robust_vs_queries.png",
        "tradeoff.png",
    } <= names
    for path in report.files:
        assert path.exists() and path.stat().st_size > 0
    csv_lines = (folder / "report" / "table1.csv").read_text().splitlines()
    columns = ["Clean", "square 1k", "square 10k", "signhunter 1k", "Worst case"]
    expected = ["model", "method", "level", "defense"]
    for column in columns:
        expected += [column, f"{column} 95% low", f"{column} 95% high"]
    assert csv_lines[0] == ",".join(expected)
    assert len(csv_lines) == 1 + 3
    payload = json.loads((folder / "report" / "table1.json").read_text())
    assert [r["method"] for r in payload["rows"]] == ["Base", "RND", "SINAI"]
    assert (folder / "report" / "robust_vs_queries.png").read_bytes()[:4] == b"\x89PNG"


def test_report_cli_and_bad_folders(folder, tmp_path) -> None:
    result = CliRunner().invoke(cli, ["report", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "table1" in result.output and "square 10k" in result.output
    assert (tmp_path / "out" / "table1.md").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["report", str(empty)])
    assert result.exit_code != 0 and "no results.sqlite" in result.output
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "not a folder" in result.output


def test_a_copied_run_is_a_row_of_its_own_with_the_same_numbers(folder) -> None:
    with ResultStore(folder / "results.sqlite") as store:
        originals = [r for r in store.runs() if r[1]["level"] == "≈1%" and r[1]["method"] == "SINAI"]
        for run, settings, _ in originals:  # Square and SignHunter
            store.copy_run({**settings, "level": "≈2%"}, store.clean(run), store.results(run))
        copies = [r for r in store.runs() if r[1]["level"] == "≈2%"]
        assert len(copies) == 2 and all(finished for _, _, finished in copies)
        for (run, _, _), (copy, _, _) in zip(originals, copies, strict=True):
            assert store.results(copy) == store.results(run) and store.clean(copy) == store.clean(run)
    t1 = next(t for t in make_report(folder).tables if t.name == "table1")
    rows = dict(zip(t1.rows, t1.cells, strict=True))
    assert rows["m", "SINAI", "≈2%"] == rows["m", "SINAI", "≈1%"]


def _eval_result(attack: str, *, p_mis: bool = False):
    """An EvalResult of 4 images (one misclassified, two broken) whose images recorded SND's norms."""
    from sinai.evaluation.protocol import EvalResult

    config = EvalConfig(attack=attack, budgets=(10, 100), describe={"model": "m"})
    results = tuple(
        ImageResult(
            i, i, 0, i != 3, s, 100, 0, 0.1, checkpoint_norms=((10, 0.2), (100, 0.1)),
            mismatches=1 if p_mis else None,
        )
        for i, s in enumerate([5, 50, None, None])
    )  # fmt: skip
    return EvalResult(config, {"images": 4}, (0.75,), results, 1.0)


def test_snd_metrics_only_for_decision_attacks() -> None:
    from sinai.reports.console import snd_metrics
    from sinai.reports.stats import wilson_interval

    text = snd_metrics(_eval_result("rays"))
    assert text is not None and "attack success %" in text and "mean linf norm" in text
    low, high = wilson_interval(2, 3)  # 2 of the 3 correctly classified images broken by query 100
    assert f"66.7 [{100 * low:.1f}, {100 * high:.1f}]" in text
    assert snd_metrics(_eval_result("square")) is None  # a score attack's query norm is just eps
    assert snd_metrics(_eval_result("pgd")) is None
    only_p_mis = snd_metrics(_eval_result("square", p_mis=True))
    assert only_p_mis is not None and only_p_mis.startswith("P_mis") and "|" not in only_p_mis


def test_plots_carry_the_intervals(folder) -> None:
    from sinai.reports.plots import curve_band, tradeoff_points

    with ResultStore(folder / "results.sqlite") as store:
        from sinai.reports.paper import load_runs

        runs = load_runs(store)
    for run in runs:
        queries, acc, low, high = curve_band(run)
        assert len(queries) == len(acc) == len(low) == len(high)
        assert all(lo <= a <= hi for lo, a, hi in zip(low, acc, high, strict=True))
        assert any(hi - lo > 10 for lo, hi in zip(low, high, strict=True))  # 4 images: wide bands
    points = tradeoff_points(runs)
    assert {p.label for p in points} == {"Base", "RND ≈1%", "SINAI ≈1%"}
    for p in points:
        assert p.robust_interval[0] <= p.robust <= p.robust_interval[1]
        assert p.clean_interval is not None and p.clean_interval[0] <= p.clean <= p.clean_interval[1]
