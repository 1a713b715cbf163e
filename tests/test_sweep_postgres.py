"""The PostgreSQL result store and Optuna storage: the same numbers as SQLite, claims that never hand one
task to two workers, and ``tune`` with 2 trial workers on one study.

The server: ``$SINAI_TEST_POSTGRES`` (``.ci/run`` starts one and exports it); these tests FAIL when it
is set but unreachable. Without it (pytest run by hand) they start a throw-away server with the same
script (``.ci/postgres``) where PostgreSQL is installed, and skip, saying so, where it is not.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import optuna
import pytest
import test_sweep_models  # noqa: F401 - registers sweep-cnn
import torch

from sinai.evaluation.store import ResultStore
from sinai.sweep import load_plan, run_sweep

REPO = Path(__file__).parent.parent
ENV = "SINAI_TEST_POSTGRES"


@pytest.fixture(scope="module")
def server() -> str:
    url = os.environ.get(ENV)
    if url:
        yield url
        return
    if not glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or not shutil.which("python3"):
        pytest.skip(f"PostgreSQL is not installed and ${ENV} is not set (.ci/run installs and starts one)")
    folder = Path(tempfile.mkdtemp(prefix="sinai-test-postgres.", dir="/tmp"))  # reachable by `nobody`
    started = subprocess.run(
        ["bash", str(REPO / ".ci" / "postgres"), "start", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode == 0, f"could not start PostgreSQL: {started.stderr}"
    yield started.stdout.strip()
    subprocess.run(["bash", str(REPO / ".ci" / "postgres"), "stop", str(folder)], timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def database(server: str) -> str:
    """A fresh database on the server for one test (its URL); dropped afterwards."""
    import psycopg

    try:
        admin = psycopg.connect(server, autocommit=True, connect_timeout=10)
    except psycopg.Error as err:
        pytest.fail(f"PostgreSQL at {server} is unreachable: {err}")
    name = f"sinai_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE DATABASE {name}")
    yield server.rsplit("/", 1)[0] + f"/{name}"
    admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()


def test_claims_hand_every_task_to_exactly_one_of_four_workers(database):
    with ResultStore(database) as store:
        runs = [store.run_id({"run": i}) for i in range(3)]
        assert store.add_tasks((r, s) for r in runs for s in range(-1, 20)) == 63
        assert store.add_tasks([(runs[0], 0)]) == 0  # recorded once
    got: list[list[tuple[int, int]]] = [[] for _ in range(4)]

    def work(mine: list) -> None:
        with ResultStore(database) as db:
            while (task := db.claim(runs, f"host:{threading.get_ident()}:{uuid.uuid4().hex}")) is not None:
                mine.append(task)

    threads = [threading.Thread(target=work, args=(mine,)) for mine in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [task for mine in got for task in mine]
    assert len(claimed) == 63 and len(set(claimed)) == 63
    with ResultStore(database) as store:
        tasks = store.tasks(runs)
        assert all(t.state == "running" and t.attempts == 1 for t in tasks)
        # A completion by an owner that lost the task writes nothing.
        first = tasks[0]
        assert not store.complete(first.run_id, first.shard, "other:1:x", seconds=1.0, clean=[0.5])
        assert store.complete(first.run_id, first.shard, first.owner, seconds=1.0, clean=[0.5, 0.25])
        assert store.clean(first.run_id) == [0.5, 0.25]
        assert not store.complete(first.run_id, first.shard, first.owner, seconds=1.0, clean=[0.1])


@pytest.fixture(scope="module")
def checkpoint(mnist_models, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sweep-pg") / "cnn.pt"
    torch.save(mnist_models["mnist-cnn"].state_dict(), path)
    return str(path)


def test_a_sweep_on_postgresql_stores_the_numbers_of_sqlite(database, checkpoint, tmp_path):
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text(
        f'''imports = ["test_sweep_models"]
models = [{{name = "sweep-cnn", checkpoint = "{checkpoint}"}}]
defenses = ["none", "RND:std=0.05"]
attacks = ["square"]
budgets = [20, 50]
images = 10
shard_size = 5
confirm = 0
'''
    )
    plan = load_plan(plan_file)
    on_pg, outcome = run_sweep(plan, store=database, device="cpu")
    assert on_pg.done and outcome.done == 6
    on_sqlite, _ = run_sweep(plan, store=str(tmp_path / "r.sqlite"), device="cpu")
    with ResultStore(database) as pg, ResultStore(tmp_path / "r.sqlite") as lite:
        assert [s for _, s, _ in pg.runs()] == [s for _, s, _ in lite.runs()]
        for (i, _, done), (j, _, _) in zip(pg.runs(), lite.runs(), strict=True):
            assert done and pg.clean(i) == lite.clean(j) and pg.results(i) == lite.results(j)
    assert [r.robust for r in on_pg.runs] == [r.robust for r in on_sqlite.runs]


def test_tune_with_two_workers_on_one_postgresql_study(database, mnist_models, mnist_images):
    from sinai.tuning.tune import Fidelity, trial_key, tune

    x, y = mnist_images
    model = mnist_models["mnist-cnn"]
    kwargs = dict(
        model_name="mnist-cnn", trials=6, population=2, passes=1, screen=Fidelity(10, 20),
        full=Fidelity(10, 20), promote=0, storage=database, study_name="pair", progress=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="parallel writers"):
        tune(model, x, y, workers=2, **{**kwargs, "storage": "sqlite:///x.db"})
    result = tune(model, x, y, workers=2, **kwargs)
    study = optuna.load_study(study_name="pair", storage=database)
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(set(numbers)) == len(numbers) and sorted(numbers) == list(range(len(numbers)))  # none lost
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)  # none left running or failed
    assert 6 <= len(complete) <= 7  # the other worker may finish the trial it had started
    # the two workers did not propose the same trials: each drew from its own place's seed (two
    # NSGA-II children may still coincide, uniform crossover copying both values from one parent)
    keys = [trial_key(trials, t) for t in complete]
    assert len(set(keys)) == len(keys)
    first = [tuple(sorted(t.params.items())) for t in complete if trial_key(trials, t) < 2]
    assert len(first) == 2 and first[0] != first[1]  # generation 0: independent random draws
    assert len(result.trials) == 6 and len({t.number for t in result.trials}) == 6
