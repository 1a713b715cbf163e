"""``sinai sweep``: plans, the ledger, and the same numbers whatever runs them (serial, 2 local worker
processes, 2 Ray workers), a worker killed with kill -9 mid-sweep, and bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_sweep_models  # noqa: F401 - registers sweep-cnn in this process too
import torch

from sinai.evaluation.protocol import evaluate
from sinai.evaluation.store import ResultStore
from sinai.sweep import load_plan, parse_plan, run_sweep, sweep_status
from sinai.sweep.executors import check_address
from sinai.sweep.runs import config_from_settings

TESTS = Path(__file__).parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def checkpoint(mnist_models, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("sweep") / "cnn.pt"
    torch.save(mnist_models["mnist-cnn"].state_dict(), path)
    return str(path)


def load_sweep_cnn(checkpoint: str):
    from sinai.models.zoo import load_model

    return load_model("sweep-cnn", checkpoint=checkpoint, device="cpu")


def write_plan(folder: Path, checkpoint: str, *, images: int = 10, budget: int = 50, extra: str = "") -> Path:
    path = folder / "plan.toml"
    path.write_text(
        f'''name = "tiny"
imports = ["test_sweep_models"]
models = [{{name = "sweep-cnn", checkpoint = "{checkpoint}"}}]
defenses = ["none", "RND:std=0.05"]
attacks = ["square"]
budgets = [20, {budget}]
images = {images}
shard_size = 5
confirm = 0
{extra}'''
    )
    return path


def rows(store: str) -> dict:
    """Every stored number, per run settings key (ids may differ between stores)."""
    with ResultStore(store) as db:
        return {
            (s["defense"]["name"], s["attack"]): (
                db.clean(i),
                [
                    (r.image, r.clean_correct, r.success_at, r.queries, r.vote_passes, r.norm)
                    for r in db.results(i)
                ],
            )
            for i, s, _ in db.runs()
        }


def kill_a_worker_mid_shard(store: str, log: list[str], timeout: float = 120) -> object:
    """Wait until a worker process holds an attack shard, kill -9 it, return its task."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.05)
        if not Path(store).exists():
            continue
        try:
            with ResultStore(store, timeout=1) as db:
                running = [t for t in db.tasks() if t.state == "running" and t.shard >= 0]
        except Exception:  # the driver is creating the store
            continue
        if running:
            os.kill(int(running[0].owner.split(":")[1]), signal.SIGKILL)
            return running[0]
    raise AssertionError(f"no shard seen running: {log}")


def test_same_numbers_serial_local_with_a_worker_killed_and_ray(checkpoint, tmp_path, monkeypatch):
    # 2 runs x (clean + 4 shards of 5 images).
    plan = load_plan(write_plan(tmp_path, checkpoint, images=20))
    serial, local, on_ray = (str(tmp_path / f"{n}.sqlite") for n in ("serial", "local", "ray"))
    status, outcome = run_sweep(plan, store=serial, device="cpu")
    assert status.done and outcome.done == 10 and outcome.failed == 0
    assert [r.tasks for r in status.runs] == [5, 5] and all(r.attempts == 5 for r in status.runs)

    # The same numbers as the evaluation protocol run in one process.
    with ResultStore(serial) as db:
        run_id, settings, finished = db.runs()[1]
        assert finished and settings["defense"]["name"] == "RND"
        config = config_from_settings(settings)
        stored, clean = db.results(run_id), db.clean(run_id)
    from sinai.models.data import mnist

    idx = torch.tensor(settings["dataset_indices"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every sweep worker
    try:
        x, y = mnist("test").load(idx), mnist("test").labels[idx]
        direct = evaluate(
            load_sweep_cnn(checkpoint), x, y, config, progress=False, dataset_indices=idx.tolist()
        )
    finally:
        torch.set_num_threads(threads)
    assert list(direct.clean) == clean and list(direct.results) == stored
    again, outcome = run_sweep(plan, store=serial, device="cpu")  # re-run: nothing left to do
    assert outcome.done == 0 and again.done

    # 2 local worker processes; one is killed with kill -9 while it holds a shard.
    log: list[str] = []
    box: dict = {}
    driver = threading.Thread(
        target=lambda: box.update(
            result=run_sweep(plan, store=local, workers=2, device="cpu", log=log.append)
        )
    )
    driver.start()
    victim = kill_a_worker_mid_shard(local, log)
    driver.join(timeout=300)
    status, outcome = box["result"]
    assert status.done and any("died" in line for line in log) and outcome.replaced >= 1
    status, outcome = run_sweep(plan, store=local, workers=2, device="cpu")  # the re-run: nothing missing
    assert status.done and outcome.done == 0
    with ResultStore(local) as db:
        tasks = db.tasks()
        assert len(tasks) == 10 and all(t.state == "done" and t.completions == 1 for t in tasks)
        assert str(os.getpid()) not in {t.owner.split(":")[1] for t in tasks}  # done by the workers
        redone = next(t for t in tasks if (t.run_id, t.shard) == (victim.run_id, victim.shard))
        assert redone.attempts == 2 and redone.owner != victim.owner  # run again, by another worker
        assert all(len(db.results(i)) == 20 for i, _, _ in db.runs())

    # 2 Ray workers on a local cluster bound to 127.0.0.1 (a Ray worker killed mid-shard: the slow test
    # below; catching a 5-image shard while it runs is a race on a loaded machine).
    with ray_cluster(monkeypatch):
        status, outcome = run_sweep(plan, store=on_ray, executor="ray", workers=2, device="cpu")
    assert status.done and outcome.failed == 0
    reference = rows(serial)
    assert len(reference) == 2 and rows(local) == reference and rows(on_ray) == reference


@contextmanager
def ray_cluster(monkeypatch):
    """A local Ray cluster bound to 127.0.0.1 whose workers import the tests' model registrations."""
    import ray

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False)  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_ray_worker_killed_mid_shard_is_retried(checkpoint, tmp_path, monkeypatch):
    plan = load_plan(write_plan(tmp_path, checkpoint, images=20))
    serial, on_ray = str(tmp_path / "serial.sqlite"), str(tmp_path / "ray.sqlite")
    run_sweep(plan, store=serial, device="cpu")
    log: list[str] = []
    box: dict = {}
    with ray_cluster(monkeypatch):
        driver = threading.Thread(
            target=lambda: box.update(
                result=run_sweep(plan, store=on_ray, executor="ray", workers=2, device="cpu", log=log.append)
            )
        )
        driver.start()
        victim = kill_a_worker_mid_shard(on_ray, log)
        driver.join(timeout=300)
    status, outcome = box["result"]
    assert status.done and outcome.failed == 0
    with ResultStore(on_ray) as db:
        tasks = db.tasks()
        assert len(tasks) == 10 and all(t.state == "done" and t.completions == 1 for t in tasks)
        redone = next(t for t in tasks if (t.run_id, t.shard) == (victim.run_id, victim.shard))
        assert redone.attempts == 2 and redone.owner != victim.owner
    assert rows(on_ray) == rows(serial)


def test_status_reports_progress_and_eta(checkpoint, tmp_path):
    plan = load_plan(write_plan(tmp_path, checkpoint))
    with pytest.raises(ValueError, match="has not been started"):
        sweep_status(plan, store=str(tmp_path / "s.sqlite"))
    run_sweep(plan, store=str(tmp_path / "s.sqlite"), device="cpu")
    status = sweep_status(plan, store=str(tmp_path / "s.sqlite"))
    assert status.done and status.eta_seconds == 0 and all(r.images == 10 for r in status.runs)
    from sinai.sweep import status_table

    assert "6/6 tasks done" in status_table(status)


# ------------------------------------------------------------------------------------ bad input
GOOD = """models = ["mnist-cnn"]
defenses = ["none"]
attacks = ["square"]
budgets = [10]
images = 10
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD + "shrad_size = 5\n", r"line 6: unknown key 'shrad_size'; valid keys: .*shard_size"),
        (GOOD.replace('"square"', '"sqare"'), r"line 3: unknown attack 'sqare'; valid attacks: square, "),
        (
            GOOD.replace('"mnist-cnn"', '"mnist-cmm"'),
            r"line 1: unknown model 'mnist-cmm'; valid models: mnist-cnn",
        ),
        (GOOD.replace('"none"', '"RND:sdt=1"'), r"line 2: .*sdt"),
        (GOOD + "[attack_args.square]\np_int = 0.1\n", r"line 6: .*p_int"),
        (GOOD + "images = [1]\n", r"not valid TOML"),
        (GOOD.replace("budgets = [10]", "budgets = [0]"), r"line 4: budgets must be positive"),
    ],
)
def test_bad_plans_name_the_line_and_the_valid_values(text, message):
    with pytest.raises(ValueError, match=message):
        parse_plan(text, source="plan.toml")


def test_unreachable_store_and_ray_address_fail_fast_in_one_line(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        check_address("127.0.0.1:9")
    with pytest.raises(ValueError, match="cannot reach the PostgreSQL store postgresql://127.0.0.1:9/x"):
        ResultStore("postgresql://u:secret@127.0.0.1:9/x")
    assert time.perf_counter() - start < 10
    result = subprocess.run(
        [sys.executable, "-m", "sinai.cli", "sweep", "status", str(tmp_path / "missing.toml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        result.returncode != 0
        and result.stderr.strip().count("\n") == 0
        and "does not exist" in result.stderr
    )


def test_the_test_model_is_the_session_cnn(checkpoint, mnist_models):
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(load_sweep_cnn(checkpoint)(x), mnist_models["mnist-cnn"](x))


def test_plan_missing_a_key_or_with_an_unknown_executor(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs 'images'"):
        parse_plan(GOOD.replace("images = 10\n", ""), source="plan.toml")
    plan = load_plan(write_plan(tmp_path, checkpoint))
    assert plan.default_store() == "runs/sweep/tiny/results.sqlite" and plan.size == 2
    with pytest.raises(ValueError, match="unknown executor 'dask'; choose one of local, ray"):
        run_sweep(plan, executor="dask")
