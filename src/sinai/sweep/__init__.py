"""``sinai sweep``: a plan of models x defenses x attacks run as (run, shard) tasks of a ledger in the
result store, by a local process pool or Ray, on SQLite or PostgreSQL (see docs/scale-out.md).

Re-running a plan does only what is missing; the numbers do not depend on the executor, the worker
count or the order, because every shard is seeded from (seed, shard) as in :func:`sinai.evaluate`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.store import ResultStore, is_postgres
from .executors import EXECUTORS, Outcome, run_local, run_ray
from .plan import Plan, load_plan, parse_plan
from .runs import CLEAN_SHARD, SweepRun, WorkerEnv, expand


@dataclass(frozen=True)
class RunStatus:
    """Progress of one run of a plan: tasks per state, mean seconds per done task and an ETA."""

    run_id: int
    label: str
    tasks: int
    done: int
    running: int
    failed: int
    pending: int
    attempts: int
    mean_seconds: float | None
    robust: float | None  # robust accuracy at the largest budget over the stored images, %
    images: int

    @property
    def left(self) -> int:
        return self.tasks - self.done


@dataclass(frozen=True)
class SweepStatus:
    runs: tuple[RunStatus, ...]
    workers: int  # distinct owners of running tasks now
    eta_seconds: float | None

    @property
    def done(self) -> bool:
        return all(r.left == 0 for r in self.runs)


def _meta_key(plan: Plan) -> str:
    return f"sweep:{plan.name}"


def run_sweep(
    plan: Plan,
    *,
    store: str | None = None,
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    device: str = "auto",
    cache_dir: str | None = None,
    retries: int = 3,
    lease: float = 120,
    log: Callable[[str], None] | None = None,
) -> tuple[SweepStatus, Outcome]:
    """Record the plan's tasks in the store, run what is missing with ``executor``, mark finished runs.

    Returns the final status and what the executor did. Tasks still failed after ``retries`` attempts
    stay in the ledger as failed (a re-run retries them).
    """
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if workers < 1 or retries < 1 or lease <= 0:
        raise ValueError(f"need workers >= 1, retries >= 1 and lease > 0, got {workers}, {retries}, {lease}")
    say = log or (lambda _msg: None)
    location = store or plan.default_store()
    from ..device import resolve_device

    # Calibrate/tune stages run in expand, here in the driver, before their runs' tasks exist; their
    # working files go beside a SQLite store (else under the plan's out folder).
    folder = Path(plan.out or f"runs/sweep/{plan.name}") if is_postgres(location) else Path(location).parent
    with ResultStore(location, timeout=10) as db:
        runs = expand(
            plan,
            db,
            device=resolve_device(device),
            cache_dir=cache_dir,
            stages=str(folder / "stages"),
            log=say,
        )
        db.set_meta(_meta_key(plan), json.dumps([[r.run_id, r.label, r.tasks] for r in runs]))
        run_ids = [r.run_id for r in runs]
        released = db.release(run_ids, lease=lease)
        retried = db.reset_failed(run_ids)
        todo = [(t.run_id, t.shard) for t in db.tasks(run_ids) if t.state != "done"]
    total = sum(r.tasks for r in runs)
    say(
        f"plan {plan.name}: {len(runs)} runs, {total} tasks, {total - len(todo)} done, {len(todo)} to do"
        + (f" ({released} released from dead workers)" if released else "")
        + (f" ({retried} failed ones retried)" if retried else "")
        + f"; store {ResultStore.describe(location)}"
    )
    env = WorkerEnv(device=device, cache_dir=cache_dir, data_root=plan.data_root, batch_size=plan.batch_size,
                    imports=plan.imports)  # fmt: skip
    if not todo:
        outcome = Outcome()
    elif executor == "ray":
        outcome = _ray_rounds(location, env, todo, run_ids, address, workers, retries, lease, say)
    else:
        outcome = run_local(location, env, run_ids, workers=workers, retries=retries, lease=lease, log=say)
    with ResultStore(location) as db:
        finished = {i for i, _, done in db.runs() if done}
        for run in runs:
            tasks = db.tasks([run.run_id])
            if run.run_id not in finished and tasks and all(t.state == "done" for t in tasks):
                db.finish(run.run_id)
                finished.add(run.run_id)
        for run in runs:  # the same configuration under another label: its results, once done
            if run.source is not None and run.source in finished and run.run_id not in finished:
                db.add_clean(run.run_id, db.clean(run.source))  # upserts: a repeat after a crash is harmless
                db.add_results(run.run_id, db.results(run.source))
                db.finish(run.run_id)
                say(f"{run.label}: the same configuration as run {run.source}; its results copied")
        return status_of(db, runs), outcome


def _ray_rounds(
    location: str,
    env: WorkerEnv,
    todo: list[tuple[int, int]],
    run_ids: list[int],
    address: str | None,
    workers: int,
    retries: int,
    lease: float,
    say: Callable[[str], None],
) -> Outcome:
    """Submit ``todo`` to Ray, then again (up to ``retries`` rounds) what the ledger still holds undone:
    a task whose Ray retry found it still held by its dead worker, or that failed with attempts left."""
    total = Outcome()
    for _ in range(retries):
        todo.sort(key=lambda t: (t[1] != CLEAN_SHARD, t))  # clean tasks first: Ray starts in order
        outcome = run_ray(location, env, todo, address=address, workers=workers, retries=retries, lease=lease,
                          log=say)  # fmt: skip
        total.done += outcome.done
        total.lost += outcome.lost
        total.seconds += outcome.seconds
        total.errors += outcome.errors
        with ResultStore(location) as db:
            db.release(run_ids, lease=lease)
            tasks = db.tasks(run_ids)
        todo = [
            (t.run_id, t.shard)
            for t in tasks
            if t.state == "pending" or (t.state == "failed" and t.attempts < retries)
        ]
        if not todo:
            break
        say(f"{len(todo)} task(s) left undone by Ray; submitting them again")
    total.failed = sum(t.state == "failed" for t in tasks)
    return total


def sweep_status(plan: Plan, *, store: str | None = None) -> SweepStatus:
    """The progress of ``plan`` in its store (read from the ledger; no model is loaded)."""
    location = store or plan.default_store()
    with ResultStore(location, timeout=10) as db:
        saved = db.meta(_meta_key(plan))
        if saved is None:
            raise ValueError(f"plan {plan.name!r} has not been started in {ResultStore.describe(location)}")
        runs = [SweepRun(int(i), label, int(n)) for i, label, n in json.loads(saved)]
        return status_of(db, runs)


def status_of(db: ResultStore, runs: list[SweepRun]) -> SweepStatus:
    tasks = db.tasks([r.run_id for r in runs])
    by_run: dict[int, list] = {}
    for t in tasks:
        by_run.setdefault(t.run_id, []).append(t)
    now, rows = time.time(), []
    for run in runs:
        mine = by_run.get(run.run_id, [])
        count = lambda state, mine=mine: sum(t.state == state for t in mine)
        shards = [t.seconds for t in mine if t.state == "done" and t.shard != CLEAN_SHARD and t.seconds]
        settings = db.settings(run.run_id)
        results = db.results(run.run_id)
        budget = max(settings["budgets"])
        robust = 100 * sum(r.robust_at(budget) for r in results) / len(results) if results else None
        rows.append(
            RunStatus(
                run.run_id,
                run.label,
                run.tasks,
                count("done"),
                count("running"),
                count("failed"),
                count("pending"),
                sum(t.attempts for t in mine),
                sum(shards) / len(shards) if shards else None,
                robust,
                len(results),
            )  # fmt: skip
        )
    owners = {t.owner for t in tasks if t.state == "running" and t.heartbeat and now - t.heartbeat < 600}
    means = [r.mean_seconds for r in rows if r.mean_seconds is not None]
    left = sum(r.left for r in rows)
    eta = None
    if left == 0:
        eta = 0.0
    elif means:
        per_task = {r.run_id: r.mean_seconds or sum(means) / len(means) for r in rows}
        eta = sum(per_task[r.run_id] * r.left for r in rows) / max(1, len(owners))
    return SweepStatus(tuple(rows), len(owners), eta)


def status_table(status: SweepStatus) -> str:
    """The status as a text table, one run a line, with totals and the ETA."""
    head = f"{'id':>4}  {'model | defense | attack':<48} {'done':>9} {'run':>4} {'fail':>4} {'s/shard':>8} "
    head += f"{'robust':>7}"
    lines = [head]
    for r in status.runs:
        mean = f"{r.mean_seconds:.2f}" if r.mean_seconds is not None else "-"
        robust = f"{r.robust:.1f}%" if r.robust is not None else "-"
        lines.append(
            f"{r.run_id:>4}  {r.label[:48]:<48} {f'{r.done}/{r.tasks}':>9} {r.running:>4} {r.failed:>4} "
            f"{mean:>8} {robust:>7}"
        )
    done = sum(r.done for r in status.runs)
    total = sum(r.tasks for r in status.runs)
    eta = "-" if status.eta_seconds is None else _duration(status.eta_seconds)
    lines.append(f"total {done}/{total} tasks done, {status.workers} worker(s) active, ETA {eta}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def snapshot(plan: Plan, store: str, folder: str) -> str:
    """Copy the plan's runs from ``store`` (e.g. PostgreSQL) into ``FOLDER/results.sqlite`` for ``sinai
    report``; returns the file."""
    target = Path(folder) / "results.sqlite"
    saved = None
    with ResultStore(store, timeout=10) as db:
        saved = db.meta(_meta_key(plan))
        if saved is None:
            raise ValueError(f"plan {plan.name!r} has not been started in {ResultStore.describe(store)}")
        runs = [(db.settings(i), db.clean(i), db.results(i)) for i, _, _ in json.loads(saved)]
    with ResultStore(target) as local:
        for settings, clean, results in runs:
            run_id = local.run_id(settings)
            if clean:
                local.add_clean(run_id, clean)
            local.add_results(run_id, results)
    return str(target)


__all__ = [
    "EXECUTORS",
    "Outcome",
    "Plan",
    "RunStatus",
    "SweepStatus",
    "load_plan",
    "parse_plan",
    "run_sweep",
    "status_table",
    "sweep_status",
]
