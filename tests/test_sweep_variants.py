"""Plan entries on a model's trained variant (``variant = "adv"``: the demo's PGD-AT row) and one
configuration under two labels (attacked once, its results copied), both through ``sinai sweep``."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import SHORT_RECIPES, use_recipes

from sinai.evaluation.store import ResultStore
from sinai.models.embedded import EMBEDDED
from sinai.sweep import parse_plan, run_sweep
from sinai.sweep.executors import Progress

PLAN = """name = "variants"
models = ["mnist-cnn"]
defenses = [
    {defense = "RND:std=0.05", method = "RND", level = "A"},
    {defense = "RND:std=0.05", method = "RND", level = "B"},
    {defense = "none", method = "Surrogate", variant = "surrogate"},
]
attacks = ["square"]
budgets = [20]
images = 10
shard_size = 5
confirm = 0
"""


def test_variant_runs_on_its_network_and_a_twin_is_copied(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SINAI_CACHE_DIR", str(tmp_path / "cache"))
    tiny = dataclasses.replace(EMBEDDED["mnist-cnn-surrogate"].train, epochs=1, augment=0, train_images=256)
    use_recipes(monkeypatch, {**SHORT_RECIPES, "mnist-cnn-surrogate": tiny})
    store = str(tmp_path / "results.sqlite")
    log: list[str] = []
    status, outcome = run_sweep(parse_plan(PLAN), store=store, device="cpu", log=log.append)
    assert status.done and outcome.failed == 0
    labels = [r.label for r in status.runs]
    assert labels == [
        "mnist-cnn | RND A | square",
        "mnist-cnn | RND B | square",
        "mnist-cnn | Surrogate | square",
    ]
    twin = status.runs[1]
    assert twin.tasks == 0  # attacked once, under the first label
    assert any("its results copied" in line for line in log)
    with ResultStore(store) as db:
        runs = {s["level"] if s.get("level") else s.get("method"): (i, s) for i, s, _ in db.runs()}
        first, second = runs["A"][0], runs["B"][0]
        assert db.results(first) == db.results(second) and db.clean(first) == db.clean(second)
        assert runs["Surrogate"][1]["network"] == "mnist-cnn-surrogate"
        assert all(t.run_id != second for t in db.tasks())
    lines: list[str] = []
    with ResultStore(store) as db:
        Progress(lines.append, db, [r.run_id for r in status.runs], every=0.0).tick()
    assert lines == ["6/6 tasks done"]  # 2 computed runs x (clean + 2 shards); the twin has none
    # A re-run finds everything done and copies nothing twice.
    again, outcome = run_sweep(parse_plan(PLAN), store=store, device="cpu")
    assert again.done and outcome.done == 0


def test_unknown_variant_names_the_valid_ones() -> None:
    bad = PLAN.replace('variant = "surrogate"', 'variant = "distilled"')
    with pytest.raises(ValueError, match="unknown variant 'distilled'; valid variants: adv, mfdv"):
        parse_plan(bad, source="plan.toml")
