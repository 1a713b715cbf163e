"""Plans with calibrate and tune stages: found once on validation images disjoint from the evaluated
ones, kept in the store's meta, reused by a re-run; and bad stage entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_sweep_models  # noqa: F401 - registers sweep-cnn
import torch

from sinai.defenses import Defense, preset
from sinai.evaluation.store import ResultStore
from sinai.sweep import load_plan, parse_plan, run_sweep
from sinai.sweep.stages import split_indices
from sinai.tuning.calibrate import calibrate


@pytest.fixture(scope="module")
def checkpoint(mnist_models, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stages") / "cnn.pt"
    torch.save(mnist_models["mnist-cnn"].state_dict(), path)
    return str(path)


def staged_plan(folder: Path, checkpoint: str) -> Path:
    path = folder / "plan.toml"
    path.write_text(
        f'''name = "staged"
imports = ["test_sweep_models"]
models = [{{name = "sweep-cnn", checkpoint = "{checkpoint}"}}]
defenses = [
    "none",
    {{calibrate = "FND", drop = [0.02, 0.05]}},
    {{calibrate = "SINAI-Attn", drop = 0.02}},
    {{tune = "SINAI", delta = 0.3, trials = 2, population = 2, screen = [10, 20], full = [10, 20]}},
]
validation = 100
attacks = ["square"]
budgets = [20]
images = 10
shard_size = 5
confirm = 0
'''
    )
    return path


def test_stages_run_once_on_validation_images_before_their_runs(checkpoint, tmp_path, monkeypatch):
    plan = load_plan(staged_plan(tmp_path, checkpoint))
    store = str(tmp_path / "out" / "results.sqlite")
    log: list[str] = []
    status, outcome = run_sweep(plan, store=store, device="cpu", log=log.append)
    assert status.done and outcome.failed == 0
    labels = [r.label for r in status.runs]
    # SINAI-Attn has no site in a CNN: left out, said so.
    assert labels == [
        "sweep-cnn | none | square",
        "sweep-cnn | FND ≈2% | square",
        "sweep-cnn | FND ≈5% | square",
        "sweep-cnn | SINAI ≈30% | square",
    ]
    assert any("SINAI-Attn has no site in sweep-cnn" in line for line in log)

    from sinai.models.data import mnist
    from sinai.models.zoo import load_model

    data = mnist("test")
    val, ev = split_indices(data.labels, 100, 10, 0, 10)
    with ResultStore(store) as db:
        runs = {(s.get("method"), s.get("level")): s for _, s, _ in db.runs()}
        stages = {k: json.loads(db.meta(k)) for k in [r[0] for r in db.db.execute("SELECT key FROM meta")]
                  if k.startswith("stage:")}  # fmt: skip
    assert all(s["dataset_indices"] == ev.tolist() for s in runs.values())
    assert not set(ev.tolist()) & set(val.tolist())

    # The calibrated std is calibrate's on the validation images; the tuned defense is the one chosen.
    model = load_model("sweep-cnn", checkpoint=checkpoint, device="cpu")
    direct = calibrate(model, data.load(val), data.labels[val], preset("FND"), drop=0.02, passes=3, seed=0)
    assert Defense.from_dict(runs["FND", "≈2%"]["defense"]) == direct.defense
    assert len(stages) == 3  # FND at 2% and 5%, one study for SINAI
    (tuned,) = [v for v in stages.values() if v["settings"]["stage"] == "tune"]
    assert runs["SINAI", "≈30%"]["defense"] == tuned["chosen"]["0.3"]["defense"]
    assert (Path(tuned["folder"]) / "tuning.json").exists() and Path(tuned["folder"]).parent.name == "stages"

    # A re-run reuses the stored stages and runs: nothing is computed again.
    def no_work(*a, **k):
        raise AssertionError("a finished stage was computed again")

    monkeypatch.setattr("sinai.tuning.calibrate.calibrate", no_work)
    monkeypatch.setattr("sinai.tuning.tune.tune", no_work)
    log.clear()
    again, outcome = run_sweep(plan, store=store, device="cpu", log=log.append)
    assert again.done and outcome.done == 0 and [r.label for r in again.runs] == labels
    assert sum("from the store" in line for line in log) == 3


GOOD = """models = ["mnist-cnn"]
defenses = ["none"]
attacks = ["square"]
budgets = [10]
images = 10
validation = 50
"""


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            '{calibrate = "FND", drop = 0.01, drops = 2}',
            r"line 2: .*unknown key\(s\) drops; valid keys: calibrate",
        ),
        ('{calibrate = "SINAI", drop = 0.01}', r"line 2: .*one-kind noise preset: RND, SND, FND"),
        ('{calibrate = "FND", drop = 1.5}', r"line 2: .*drop must be a fraction in \(0, 1\)"),
        ('{tune = "RND", delta = 0.01}', r"line 2: .*tune tunes SINAI, not 'RND'"),
        ('{tune = "SINAI", delta = 0.01, trials = 0}', r"line 2: .*trials must be an integer >= 1"),
        (
            '{tune = "SINAI", delta = 0.01, screen = [80, 10]}',
            r"line 2: .*80 images; the plan has 50 validation",
        ),
    ],
)
def test_bad_stage_entries_name_the_line(entry, message):
    with pytest.raises(ValueError, match=message):
        parse_plan(GOOD.replace('["none"]', f"[{entry}]"), source="plan.toml")


def test_stages_need_validation_images():
    text = GOOD.replace("validation = 50\n", "").replace('["none"]', '[{calibrate = "FND", drop = 0.01}]')
    with pytest.raises(ValueError, match=r"line 2: .*needs 'validation = N'"):
        parse_plan(text, source="plan.toml")
