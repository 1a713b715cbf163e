"""Who runs a sweep's tasks: this process, a local pool of worker processes, or Ray core tasks.

Every executor goes through the ledger: a worker claims a task in one transaction, works, and writes the
results in the same transaction that marks the task done, only while it still holds the claim. So a
worker killed mid-shard leaves a "running" task and no rows; the task goes back to pending as soon as
its owner is seen dead (same host) or silent for ``lease`` seconds, and is run again from its seeds.

- ``local``, ``workers=1``: the tasks run in this process, one after another.
- ``local``, ``workers=N``: N spawned processes (one torch thread each) pull tasks until none is left;
  a worker that dies is replaced (its task released first), up to ``retries`` times per worker slot.
- ``ray``: one Ray core task per ledger task, ``max_retries=retries`` (Ray resubmits a task whose
  worker died; the new attempt takes the task over in the ledger), ``num_cpus=1`` and, where the
  cluster has GPUs, ``num_gpus`` each.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlparse

from ..evaluation.store import ResultStore, owner_id
from .runs import Worker, WorkerEnv

EXECUTORS = ("local", "ray")


@dataclass
class Outcome:
    """What an executor did: tasks done, failed and lost (taken over by another owner), workers
    replaced after dying, and seconds of wall time."""

    done: int = 0
    failed: int = 0
    lost: int = 0
    replaced: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, status: str) -> None:
        if status in ("done", "failed", "lost"):
            setattr(self, status, getattr(self, status) + 1)


class Progress:
    """Says how many of a sweep's tasks are done, at most every ``every`` seconds, with an ETA from the
    rate so far (a long sweep is otherwise silent between its first and last line)."""

    def __init__(
        self, say: Callable[[str], None], store: ResultStore, run_ids: Sequence[int], every: float = 30.0
    ) -> None:
        self.say, self.store, self.run_ids, self.every = say, store, list(run_ids), every
        self.start = self.last = time.perf_counter()
        self.total, self.before = self._counts()

    def _counts(self) -> tuple[int, int]:
        tasks = self.store.tasks(self.run_ids)
        return len(tasks), sum(t.state == "done" for t in tasks)

    def tick(self) -> None:
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        total, done = self._counts()
        new, left = done - self.before, total - done
        eta = f", about {(now - self.start) / new * left / 60:.0f} min left" if new and left else ""
        self.say(f"{done}/{total} tasks done{eta}")


def pull_tasks(
    location: str,
    env: WorkerEnv,
    run_ids: Sequence[int],
    retries: int,
    log: Callable[[str], None] | None = None,
) -> Outcome:
    """Claim and run tasks of ``run_ids`` until none is left (the loop of every local worker)."""
    worker = Worker(location, env)
    outcome = Outcome()
    progress = Progress(log, worker.store, run_ids) if log else None
    try:
        while True:
            owner = owner_id()
            task = worker.store.claim(run_ids, owner, retries=retries)
            if task is None:
                return outcome
            outcome.add(worker.run_task(*task, owner))
            if progress:
                progress.tick()
    finally:
        worker.close()


def _local_worker(location: str, env: WorkerEnv, run_ids: Sequence[int], retries: int) -> None:
    try:
        pull_tasks(location, env, run_ids, retries)
    except KeyboardInterrupt:  # ctrl-C reaches every process: the parent says it once; a claim expires
        raise SystemExit(130) from None


def run_local(
    location: str,
    env: WorkerEnv,
    run_ids: Sequence[int],
    *,
    workers: int = 1,
    retries: int = 3,
    lease: float = 120,
    log: Callable[[str], None] | None = None,
) -> Outcome:
    """Run the pending tasks of ``run_ids`` here (``workers=1``) or in ``workers`` spawned processes."""
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    if workers == 1:
        outcome = pull_tasks(location, env, run_ids, retries, log=log)
        outcome.seconds = time.perf_counter() - start
        return outcome
    ctx = multiprocessing.get_context("spawn")
    outcome = Outcome()
    with ResultStore(location) as store:
        before = sum(t.state == "done" for t in store.tasks(run_ids))
    spawn = lambda: ctx.Process(
        target=_local_worker, args=(location, env, list(run_ids), retries), daemon=True
    )
    procs = [spawn() for _ in range(workers)]
    for proc in procs:
        proc.start()
    budget = retries * workers  # replacements before giving up on dying workers
    with ResultStore(location) as store:
        progress = Progress(say, store, run_ids)
        while procs:
            procs[0].join(timeout=0.5)
            progress.tick()
            for proc in [p for p in procs if not p.is_alive()]:
                procs.remove(proc)
                if proc.exitcode == 0:
                    continue
                # Killed or crashed mid-task: its claim is released at once, and another worker replaces it.
                released = store.release(run_ids, lease=lease)
                say(f"worker {proc.pid} died (exit {proc.exitcode}); {released} task(s) back to pending")
                if budget > 0 and _left(store, run_ids, retries):
                    budget -= 1
                    outcome.replaced += 1
                    procs.append(spawn())
                    procs[-1].start()
        store.release(run_ids, lease=lease)
        tasks = store.tasks(run_ids)
    outcome.done = sum(t.state == "done" for t in tasks) - before
    outcome.failed = sum(t.state == "failed" for t in tasks)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _left(store: ResultStore, run_ids: Sequence[int], retries: int) -> bool:
    return any(
        t.state == "pending" or (t.state == "failed" and t.attempts < retries) for t in store.tasks(run_ids)
    )


# --------------------------------------------------------------------------------------------- Ray
_WORKERS: dict[tuple[str, WorkerEnv], Worker] = {}


def ray_task(location: str, env: WorkerEnv, run_id: int, shard: int, lease: float, retries: int) -> str:
    """One ledger task as a Ray task: take it (if nobody live holds it) and run it; the process keeps
    its Worker (models, images) for the next task."""
    key = (location, env)
    if key not in _WORKERS:
        _WORKERS[key] = Worker(location, env)
    worker = _WORKERS[key]
    owner = owner_id()
    if not worker.store.claim_task(run_id, shard, owner, lease=lease, retries=retries):
        return "skipped"
    return worker.run_task(run_id, shard, owner)


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, in one line, when a Ray address does not answer."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ValueError(f"a Ray address is HOST:PORT, ray://HOST:PORT or auto, got {address!r}")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise ValueError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def init_ray(address: str | None, workers: int) -> None:
    """Join the cluster at ``address``, or start a local one with ``workers`` CPUs on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if address:
        check_address(address)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(
            num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )  # fmt: skip


def run_ray(
    location: str,
    env: WorkerEnv,
    tasks: Sequence[tuple[int, int]],
    *,
    address: str | None = None,
    workers: int = 2,
    retries: int = 3,
    lease: float = 120,
    gpus: float | None = None,
    log: Callable[[str], None] | None = None,
) -> Outcome:
    """Run ``tasks`` as Ray core tasks (see the module docstring); ``gpus`` per task defaults to 1 where
    the cluster has GPUs."""
    import ray

    start = time.perf_counter()
    init_ray(address, workers)
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    remote = ray.remote(max_retries=retries, num_cpus=1, num_gpus=gpus)(ray_task)
    refs = [remote.remote(location, env, run_id, shard, lease, retries) for run_id, shard in tasks]
    outcome = Outcome()
    for ref in refs:
        try:
            outcome.add(ray.get(ref))
        except ray.exceptions.RayError as err:  # retries exhausted: the ledger keeps the task for a re-run
            outcome.failed += 1
            outcome.errors.append(str(err).strip().splitlines()[0])
    outcome.seconds = time.perf_counter() - start
    if log and outcome.errors:
        log(f"{len(outcome.errors)} Ray task(s) gave up: {outcome.errors[0]}")
    return outcome


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 4))
