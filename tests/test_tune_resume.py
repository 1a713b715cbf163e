"""Tuning resumes faithfully after ``kill -9`` (SINAI section 4.3's study, issue 18 part 3); a study with
no feasible trial says so in every table and plot; ``sinai calibrate`` shows its progress."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import matplotlib
import optuna
import pytest
import torch
from click.testing import CliRunner

from sinai.cli import cli
from sinai.evaluation import EvalConfig
from sinai.evaluation.store import ImageResult, ResultStore
from sinai.models.embedded import FORMAT_VERSION, cache_path
from sinai.reports.console import tuning_table
from sinai.reports.plots import plot_tuning
from sinai.reports.report import make_report, write_tuning
from sinai.tuning.tune import (
    WORKER_ATTR,
    Fidelity,
    TrialSeededNSGAII,
    no_feasible_text,
    recover_interrupted,
    this_worker,
    tune,
    worker_alive,
)

COMPLETE, RUNNING = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING


@pytest.fixture(scope="module")
def cache(mnist_models, tmp_path_factory) -> Path:
    """A model cache with the session's short-trained CNN under its default name: ``--cache-dir`` loads
    it in this process and in a subprocess alike, with no training."""
    path = tmp_path_factory.mktemp("cache")
    state = {k: v.detach().cpu() for k, v in mnist_models["mnist-cnn"].state_dict().items()}
    payload = {"format": FORMAT_VERSION, "name": "mnist-cnn", "state_dict": state, "metrics": {}}
    torch.save(payload, cache_path("mnist-cnn", path))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _study(storage: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


def _retry_history(trial: optuna.trial.FrozenTrial) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)


# ------------------------------------------------------------------------- the sampler and recovery
def test_worker_alive_tells_a_running_process_from_a_dead_one() -> None:
    assert worker_alive(this_worker()) is True
    host = this_worker().rsplit(":", 2)[0]
    assert worker_alive(f"{host}:{_dead_pid()}:") is False
    assert worker_alive(f"{host}:{os.getpid()}:1") is False  # the pid, reused by another process
    assert worker_alive(f"another-host-{host}:{os.getpid()}:") is None
    assert worker_alive(None) is None and worker_alive("garbage") is None


def _toy_objective(trial: optuna.Trial) -> tuple[float, float]:
    trial.set_user_attr(WORKER_ATTR, this_worker())
    x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
    trial.set_constraint("c", x + y - 1.3)
    return x * (1 - y), y - x * x


def _toy_study(storage: optuna.storages.BaseStorage) -> optuna.Study:
    """A study on ``storage`` with a new sampler, as a new process would open it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=storage, study_name="toy", directions=["maximize", "maximize"],
        sampler=TrialSeededNSGAII(population_size=2, seed=7), load_if_exists=True,
    )  # fmt: skip


def test_a_restarted_sampler_repeats_nothing_and_retries_the_dead_trial() -> None:
    """A fresh sampler on a study whose trial 4 died mid-way: trial 4 is failed and its parameters asked
    again, and the study goes on with the trials of a run that never stopped."""
    through = _toy_study(optuna.storages.InMemoryStorage())
    through.optimize(_toy_objective, n_trials=8)

    storage = optuna.storages.InMemoryStorage()
    cut = _toy_study(storage)
    cut.optimize(_toy_objective, n_trials=4)
    dying = cut.ask()  # as a process killed in trial 4 leaves it: RUNNING, parameters drawn
    dying.suggest_float("x", 0, 1), dying.suggest_float("y", 0, 1)
    dying.set_user_attr(WORKER_ATTR, f"{this_worker().rsplit(':', 2)[0]}:{_dead_pid()}:")
    resumed = _toy_study(storage)  # a new process: a new sampler, seeded alike
    assert recover_interrupted(resumed, exclusive=True) == [dying.number]
    assert recover_interrupted(resumed, exclusive=True) == []  # queued once, not once per run
    resumed.optimize(_toy_objective, n_trials=4)

    trials = resumed.get_trials()
    assert trials[dying.number].state == optuna.trial.TrialState.FAIL
    (retry,) = [t for t in trials if _retry_history(t)]
    assert _retry_history(retry) == [dying.number] and retry.params == trials[dying.number].params
    done = [t for t in trials if t.state == COMPLETE]
    expected = [t for t in through.get_trials() if t.state == COMPLETE]
    assert [t.params for t in done] == [t.params for t in expected]
    assert [t.values for t in done] == [t.values for t in expected]


def test_a_running_trial_of_a_live_process_is_left_alone() -> None:
    study = _toy_study(optuna.storages.InMemoryStorage())
    live = study.ask()
    live.set_user_attr(WORKER_ATTR, this_worker())
    unknown = study.ask()  # no worker recorded: a SQLite study has one writer, so it is stale
    assert recover_interrupted(study, exclusive=False) == []
    assert recover_interrupted(study, exclusive=True) == [unknown.number]
    assert study.get_trials()[live.number].state == RUNNING


# ----------------------------------------------------------------------- kill -9 of a real process
TUNE_ARGS = (
    "tune", "--model", "mnist-cnn", "--device", "cpu", "--images", "100", "--trials", "4",
    "--population", "2", "--screen", "10:15", "--full", "12:20", "--passes", "1", "--delta", "0.02,0.1",
)  # fmt: skip
"""Generation 0 is trials 0-1 (random), so the kill lands in a trial NSGA-II bred from parents."""


def _states(db: Path) -> list[tuple[int, str, int]]:
    """(number, state, parameters set) of every trial, read while another process writes."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.05) as con:
            return con.execute(
                "SELECT number, state, (SELECT COUNT(*) FROM trial_params p WHERE p.trial_id = t.trial_id)"
                " FROM trials t ORDER BY number"
            ).fetchall()
    except sqlite3.Error:  # not created yet, or locked by the writer for a moment
        return []


def _completed(out: Path) -> list[optuna.trial.FrozenTrial]:
    study = _study(f"sqlite:///{out / 'study.sqlite'}", "mnist-cnn-SINAI")
    return study.get_trials(states=(COMPLETE,))


def test_tune_killed_with_sigkill_resumes_to_the_uninterrupted_choice(cache, tmp_path) -> None:
    args = (*TUNE_ARGS, "--cache-dir", str(cache))
    runner = CliRunner()
    through = runner.invoke(cli, [*args, "--out", str(tmp_path / "a")], catch_exceptions=False)
    assert through.exit_code == 0, through.output

    out = tmp_path / "b"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sinai.cli", *args, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 50
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            states = _states(out / "study.sqlite")
            if sum(s == "COMPLETE" for _, s, _ in states) >= 2 and any(
                s == "RUNNING" and n_params for _, s, n_params in states
            ):
                break  # inside trial 2 or later, its parameters drawn
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    (killed,) = [n for n, s, _ in _states(out / "study.sqlite") if s == "RUNNING"]
    assert len(_completed(out)) < 4

    resumed = runner.invoke(cli, [*args, "--out", str(out)], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert f"trial {killed} was cut short" in resumed.output
    study = _study(f"sqlite:///{out / 'study.sqlite'}", "mnist-cnn-SINAI")
    trials = study.get_trials()
    assert trials[killed].state == optuna.trial.TrialState.FAIL  # not RUNNING forever
    assert not [t for t in trials if t.state in (RUNNING, optuna.trial.TrialState.WAITING)]
    (retry,) = [t for t in trials if _retry_history(t)]
    assert _retry_history(retry) == [killed] and retry.state == COMPLETE
    # Its parameters asked again: every one it had drawn when killed (a kill between two suggestions
    # leaves some undrawn; the retry draws those from the same per-trial seed).
    assert trials[killed].params and retry.params.items() >= trials[killed].params.items()
    # The same trials in the same order as the run that never stopped: no parameters asked again after
    # the restart (a sampler seeded anew would repeat trial 0's), none skipped.
    done, expected = _completed(out), _completed(tmp_path / "a")
    assert [t.params for t in done] == [t.params for t in expected] and len(done) == 4
    # ... and so the same choice at every delta.
    chosen = [json.loads((folder / "tuning.json").read_text())["chosen"] for folder in (tmp_path / "a", out)]
    strip = lambda c: {d: t and {k: v for k, v in t.items() if k != "number"} for d, t in c.items()}
    assert strip(chosen[0]) == strip(chosen[1])
    lines = [[ln for ln in r.output.splitlines() if ln.startswith("delta ")] for r in (through, resumed)]
    assert lines[0] == lines[1] and len(lines[0]) == 2


# ------------------------------------------------------------------------------ infeasible studies
def test_a_study_with_no_feasible_trial_says_so_everywhere(mnist_models, mnist_images, tmp_path) -> None:
    model = mnist_models["mnist-cnn"]
    x, y = mnist_images
    result = tune(
        model, x, y, deltas=(0.01, 0.02), space={"relu.std": (3.5, 4.0)}, model_name="mnist-cnn", trials=3,
        population=2, passes=1, screen=Fidelity(10, 10), full=Fidelity(10, 10),
        storage=f"sqlite:///{tmp_path / 's.sqlite'}", seed=0, progress=False,
    )  # fmt: skip
    assert result.unmet == (0.01, 0.02) and not result.pareto
    table = tuning_table(result)
    for d in (0.01, 0.02):
        assert no_feasible_text(d) in table and "no feasible configuration within δ" in no_feasible_text(d)

    # The Pareto plot says so in words (kept as text in an SVG) and shows the trials' clean accuracy.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        svg = plot_tuning(result, tmp_path / "pareto.svg").read_text()
    assert "no feasible configuration within δ = 1%" in svg and "infeasible trials (3)" in svg

    # The report (and so the demo's tables) keeps the tuned row, saying why it has no numbers.
    folder = tmp_path / "run"
    write_tuning(result, folder / "stages" / "mnist-cnn-SINAI", "mnist-cnn")
    with ResultStore(folder / "results.sqlite") as store:
        for method in ("Base", "RND"):
            describe = {"model": "mnist-cnn", "method": method, "level": "≈1%" if method == "RND" else ""}
            config = EvalConfig(attack="square", budgets=(100,), describe=describe)
            run = store.run_id(config.settings(images=4, dataset_indices=[0, 1, 2, 3]))
            store.add_clean(run, [0.98])
            store.add_results(
                run, [ImageResult(i, i, 0, True, 10 * i or None, 100, 0, 0.1) for i in range(4)]
            )
            store.finish(run)
    report = make_report(folder)
    for table in report.tables:
        rows = {r: cells for r, cells in zip(table.rows, table.cells, strict=True)}
        for d in ("1", "2"):
            assert rows[("mnist-cnn", "SINAI", f"≈{d}%")][0] == f"no feasible configuration within δ = {d}%"
        assert "no feasible configuration within δ = 1%" in table.markdown()
    saved = json.loads((folder / "report" / "table1.json").read_text())
    assert any(r["method"] == "SINAI" and "no feasible" in str(r["Clean"]) for r in saved["rows"])


# --------------------------------------------------------------------------------- calibrate progress
def test_calibrate_shows_its_progress(cache, tmp_path) -> None:
    args = [
        "calibrate", "--model", "mnist-cnn", "--device", "cpu", "--cache-dir", str(cache), "--images", "60",
        "--defense", "RND", "--drop", "0.05", "--tolerance", "0.03", "--passes", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    shown = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert "calibrate RND to 5% drop" in shown.output and "step 1: std 0.5 -> drop" in shown.output
    quiet = CliRunner().invoke(cli, [*args, "--no-progress"], catch_exceptions=False)
    assert quiet.exit_code == 0 and "step 1" not in quiet.output
    assert quiet.stdout.splitlines()[-1] == shown.stdout.splitlines()[-1]  # the same table
