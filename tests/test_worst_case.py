"""The worst-case column and table, the white-box table and the transfer column of ``sinai report``.

Worst case: an image counts as robust only if no attack run on the row broke it (each run at its
largest budget, joined on the dataset index, one threat model). It is at most every single attack's
robust accuracy; where different attacks break different images it is strictly below all of them.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from click.testing import CliRunner
from conftest import images
from scipy.stats import binomtest
from torch import nn

import sinai.demo
from sinai.attacks import ThreatModel, attack_class
from sinai.cli import cli
from sinai.defenses import preset
from sinai.evaluation import EvalConfig
from sinai.evaluation.protocol import evaluate
from sinai.evaluation.store import ImageResult, ResultStore
from sinai.models.classifier import ImageClassifier
from sinai.reports.paper import build_tables, load_runs
from sinai.reports.report import make_report
from sinai.reports.stats import wilson_interval
from sinai.reports.worst import attack_kind, attack_label

LINF = ThreatModel("linf", 0.1)
NOT_ATTACKS = {"Clean", "CW median l2", "Worst case", "gap", "n"}


def _add(
    store: ResultStore,
    attack: str,
    outcomes: str,
    *,
    method: str = "RND",
    level: str = "≈1%",
    model: str = "m",
    attack_args: dict | None = None,
    threat: ThreatModel = LINF,
    budget: int = 1000,
    first: int = 100,
    norms: dict[int, float] | None = None,
    clean: float = 0.9,
) -> None:
    """A finished run of ``attack`` on images ``first, first + 1, ...``: per image "R" robust, "B" broken
    (at query 10), "W" misclassified before the attack. Settings as ``EvalConfig.settings`` writes them,
    with any attack name (an unregistered one too)."""
    describe = {"model": model, "method": method, "level": level}
    indices = list(range(first, first + len(outcomes)))
    config = EvalConfig(attack="square", threat=threat, budgets=(budget,), describe=describe)
    settings = config.settings(images=len(indices), dataset_indices=indices)
    settings.update(attack=attack, attack_args=dict(attack_args or {}))
    run = store.run_id(settings)
    store.add_clean(run, [clean])
    store.add_results(
        run,
        [
            ImageResult(i, d, 0, o != "W", 10 if o == "B" else None, 1, 0, (norms or {}).get(i, 0.5))
            for i, (d, o) in enumerate(zip(indices, outcomes, strict=True))
        ],
    )
    store.finish(run)


@pytest.fixture()
def folder(tmp_path):
    """12 images; on RND every attack breaks other images, and images 6 and 7 survive them all."""
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "square", "BBBBBBBBBBRW", method="Base", level="")
        _add(store, "square", "RRRRRRRRBBBW")
        _add(store, "rays", "BRRRRRRRRRRW")
        _add(store, "pgd", "RBRRRRRRRRRW", attack_args={"steps": 20})
        _add(store, "fgsm", "RRBRRRRRRRRW")
        _add(store, "cw", "RRRBRRRRBBRW", norms={3: 1.2, 8: 0.8, 9: 2.0})
        _add(store, "autoattack", "RRRRBRRRRRRW", attack_args={"version": "rand"})
        _add(store, "transfer", "RRRRRBRRRRRW", attack_args={"source": "base", "attack": "square"})
    return tmp_path


def _tables(folder) -> dict:
    return {t.name: t for t in make_report(folder).tables}


def _cells(table) -> dict:
    return {r: dict(zip(table.columns, c, strict=True)) for r, c in zip(table.rows, table.cells, strict=True)}


def _assert_worst_below_every_attack(table) -> None:
    for row, cells in _cells(table).items():
        worst = cells["Worst case"]
        assert worst is not None, row
        for column, value in cells.items():
            if column not in NOT_ATTACKS and value is not None:
                assert worst <= value, (table.name, row, column)


def test_wilson_interval_matches_scipy() -> None:
    for k, n in [(0, 50), (3, 50), (25, 50), (50, 50), (1, 1), (7, 20)]:
        ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)


def test_kinds_and_labels() -> None:
    assert [attack_kind(a) for a in ("square", "rays", "pgd", "transfer")] == [
        "score",
        "decision",
        "white-box",
        "transfer",
    ]
    assert attack_kind("an-attack-of-another-version") == "score"
    assert attack_label("pgd", {}) == "PGD-20" and attack_label("pgd", {"steps": 100}) == "PGD-100"
    assert attack_label("autoattack", {}) == "AutoAttack"
    assert attack_label("autoattack", {"version": "rand"}) == "AutoAttack-rand"
    assert attack_label("eotpgd", {}) == "EOT-PGD" and attack_label("mifgsm", {}) == "MI-FGSM"
    assert attack_label("eotpgd", {"eot_iter": 80}) == "EOT-PGD-80"
    assert attack_label("pgd", {}, eot=10, bpda=True) == "PGD-20 M=10 BPDA"
    assert attack_label("transfer", {"source": "base", "attack": "square"}) == "transfer (square from base)"
    assert attack_label("transfer", {"source": "runs/sur.pt", "attack": "pgd"}) == "transfer (pgd from sur)"
    assert attack_label("square", {}, eot=5) == "square M=5"


def test_worst_case_is_below_every_attack_and_strictly_below_each_here(folder) -> None:
    tables = _tables(folder)
    assert list(tables) == ["table1", "table2", "whitebox", "worst_case"]
    wc = tables["worst_case"]
    assert wc.columns == [
        "Clean",
        "square",
        "rays",
        "PGD-20",
        "FGSM",
        "CW",
        "AutoAttack-rand",
        "transfer (square from base)",
        "Worst case",
        "gap",
        "n",
    ]
    cells = _cells(wc)
    rnd = cells["m", "RND", "≈1%"]
    assert rnd["Worst case"] == pytest.approx(100 * 2 / 12)  # images 6 and 7
    singles = [v for c, v in rnd.items() if c not in NOT_ATTACKS]
    assert len(singles) == 7 and all(rnd["Worst case"] < v for v in singles)
    assert rnd["square"] == pytest.approx(100 * 8 / 12) and rnd["rays"] == pytest.approx(100 * 10 / 12)
    assert rnd["gap"] == pytest.approx(rnd["rays"] - rnd["Worst case"])  # best query attack: RayS
    assert rnd["n"] == 12
    base = cells["m", "Base", ""]  # one attack on the row: the worst case is that attack
    assert base["Worst case"] == base["square"] == pytest.approx(100 / 12) and base["gap"] == 0.0
    low, high = binomtest(2, 12).proportion_ci(0.95, method="wilson")
    assert wc.intervals[wc.rows.index(("m", "RND", "≈1%")), wc.columns.index("Worst case")] == pytest.approx(
        (100 * low, 100 * high)
    )
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in wc.markdown()
    assert any("no attack run on the row" in note for note in wc.notes)
    # Every table with a Worst case column carries the same number for the row, over all its attacks.
    for name in ("table1", "table2", "whitebox"):
        row = _cells(tables[name])["m", "RND", "≈1%"]
        assert row["Worst case"] == pytest.approx(rnd["Worst case"]), name
        _assert_worst_below_every_attack(tables[name])
    _assert_worst_below_every_attack(wc)


def test_whitebox_table_layout(folder) -> None:
    wb = _tables(folder)["whitebox"]
    assert wb.columns == [
        "Clean",
        "PGD-20",
        "FGSM",
        "MI-FGSM",
        "CW",
        "CW median l2",
        "AutoAttack",
        "AutoAttack-rand",
        "Worst case",
    ]
    assert wb.rows == [("m", "RND", "≈1%")]  # Base has no white-box run
    rnd = _cells(wb)["m", "RND", "≈1%"]
    assert rnd["Clean"] == 90.0 and rnd["PGD-20"] == pytest.approx(100 * 10 / 12)
    assert rnd["MI-FGSM"] is None and rnd["AutoAttack"] is None  # not run: "–"
    assert rnd["CW"] == pytest.approx(100 * 8 / 12)
    assert rnd["CW median l2"] == pytest.approx(statistics.median([1.2, 0.8, 2.0]))  # broken images only
    line = next(line for line in wb.markdown().splitlines() if line.startswith("| m "))
    assert "| – " in line and "| 1.200 " in line
    assert any("median l2" in note for note in wb.notes)


def test_transfer_and_whitebox_runs_stay_out_of_the_query_tables(folder) -> None:
    tables = _tables(folder)
    assert tables["table1"].columns == ["Clean", "square 1k", "Worst case"]
    assert tables["table2"].columns == ["Clean", "rays 1k", "Worst case"]


def test_worst_case_on_real_runs(tmp_path) -> None:
    """Real evaluations (score, decision, white-box, transfer) on one defended model: the worst case is
    the per-image join of the stored runs (attacks that broke different images), below every attack."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    model = ImageClassifier(net, input_shape=(1, 16, 16), num_classes=10, mean=(0.5,), std=(0.5,)).eval()
    x = images(20, seed=1)
    with torch.no_grad():
        y = model(x).argmax(1)
    attacks = [("square", {}), ("rays", {}), ("fgsm", {}), ("pgd", {"steps": 5})]
    attacks.append(("transfer", {"source": "base", "attack": "square", "queries": 30}))
    describe = {"model": "linear", "method": "RND", "level": ""}
    robust = {}
    with ResultStore(tmp_path / "results.sqlite") as store:
        for attack, args in attacks:
            config = EvalConfig(
                attack=attack, attack_args=args, defense=preset("RND", input={"std": 0.05}),
                threat=ThreatModel("linf", 0.01), budgets=(30,), passes=1, votes=3, vote_rule="fixed",
                describe=describe,
            )  # fmt: skip
            result = evaluate(model, x, y, config, store=store, progress=False)
            robust[attack] = {r.dataset_index for r in result.results if r.robust_at(30)}
        runs = load_runs(store)
    tables = {t.name: t for t in build_tables(runs)}
    assert list(tables) == ["table1", "table2", "whitebox", "worst_case"]
    survivors = set.intersection(*robust.values())
    row = _cells(tables["worst_case"])["linear", "RND", ""]
    assert row["Worst case"] == pytest.approx(100 * len(survivors) / 20) and row["n"] == 20
    for name in ("table1", "table2", "whitebox", "worst_case"):
        _assert_worst_below_every_attack(tables[name])
    singles = [100 * len(v) / 20 for v in robust.values()]
    assert row["Worst case"] <= min(singles)
    # the join is over images, not counts: some two attacks here broke different images
    assert any(not a <= b and not b <= a for a in robust.values() for b in robust.values())
    assert "transfer (square from base)" in tables["worst_case"].columns


def test_runs_on_other_images_are_joined_on_their_intersection(tmp_path) -> None:
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "square", "RRRRBBBBRR")  # images 100..109
        _add(store, "rays", "BRRRRR", first=104)  # images 104..109
    wc = _tables(tmp_path)["worst_case"]
    row = _cells(wc)["m", "RND", "≈1%"]
    assert row["n"] == 6  # 104..109
    assert row["Worst case"] == pytest.approx(100 * 2 / 6)  # 108, 109 (104 broken by both, 105-107 by square)
    assert row["square"] == pytest.approx(100 * 2 / 6) and row["rays"] == pytest.approx(100 * 5 / 6)
    assert any("attacked different images (6/10)" in note and "the 6 images" in note for note in wc.notes)
    t1 = _tables(tmp_path)["table1"]
    assert any("different images" in note for note in t1.notes)


def test_threat_models_are_never_joined(tmp_path) -> None:
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "pgd", "RRBB")
        _add(store, "fgsm", "RBRR")
        _add(store, "cw", "BRRR", threat=ThreatModel("l2", 1.5))
    tables = _tables(tmp_path)
    wc = _cells(tables["worst_case"])
    assert set(wc) == {("m", "RND", "≈1% l2 1.5"), ("m", "RND", "≈1% linf 0.1")}
    assert wc["m", "RND", "≈1% linf 0.1"]["Worst case"] == 25.0
    assert wc["m", "RND", "≈1% l2 1.5"]["Worst case"] == 75.0 == wc["m", "RND", "≈1% l2 1.5"]["CW"]
    wb = tables["whitebox"]
    assert _cells(wb)["m", "RND", "≈1%"]["Worst case"] == 25.0  # most white-box runs here are linf
    assert any("several threat models" in n and "joins the linf 0.1 runs" in n for n in wb.notes)


def test_an_unregistered_attack_counts_as_a_score_attack(tmp_path) -> None:
    with ResultStore(tmp_path / "results.sqlite") as store:
        _add(store, "oldattack", "RRBB")
    tables = _tables(tmp_path)
    assert tables["table1"].columns == ["Clean", "oldattack 1k", "Worst case"]
    assert _cells(tables["worst_case"])["m", "RND", "≈1%"]["Worst case"] == 50.0


def test_report_cli_prints_and_writes_the_new_tables(folder, tmp_path) -> None:
    result = CliRunner().invoke(cli, ["report", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for text in ("whitebox:", "worst_case:", "Worst case", "transfer (square from base)", "CW median l2"):
        assert text in result.output
    assert "no attack run on the row" in result.output  # the rule, under the tables
    out = tmp_path / "out"
    header = (out / "worst_case.csv").read_text().splitlines()[0]
    assert "Worst case,Worst case 95% low,Worst case 95% high,gap,n" in header
    payload = json.loads((out / "worst_case.json").read_text())
    rnd = next(r for r in payload["rows"] if r["method"] == "RND")
    assert rnd["n"] == 12 and len(rnd["Worst case 95% interval"]) == 2 and payload["notes"]
    assert "no attack run on the row" in (out / "worst_case.md").read_text()
    assert (out / "whitebox.md").exists()


def test_demo_adds_the_transfer_attack() -> None:
    assert sinai.demo.demo_attacks()[-1] == "transfer"
    args = sinai.demo.demo_attack_args("transfer", "linf", 200)
    assert args == {"source": "base", "attack": "square", "queries": 200}
    assert set(args) <= set(attack_class("transfer").parameters())
    assert sinai.demo.demo_attack_args("nes", "linf", 200) == {"lr": 0.05, "n_samples": 20}
