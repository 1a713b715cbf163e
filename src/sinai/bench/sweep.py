"""``sinai bench sweep``: one plan of CPU-bound shards run serially, by 2 local workers and by 2 Ray
workers, in one run: the speedup of the pool (target: >= 1.7x with 2 workers on 2 cores), Ray's
overhead per task, and the cost per query that sizes the papers' protocol.

Each executor writes a fresh store, so each does every task; the stores must hold identical numbers
(checked). Ray's overhead per task is its wall time times its workers, less the tasks' own compute time,
over the tasks. The papers' protocol (1000 images x 10k queries x 5 attacks x 6 methods x 2 drops x
4 models) is at most 2.4e9 counted queries; its hours on the measured model and device are that times the
measured seconds per counted query (an upper bound: attacks stop at success)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PAPERS_QUERIES = 1000 * 10_000 * 5 * 6 * 2 * 4
"""The papers' full protocol in counted queries at most: images x budget x attacks x methods x drops x
models."""


@dataclass(frozen=True)
class SweepBench:
    model: str
    shards: int
    images: int
    budget: int
    serial_s: float
    local_s: float
    ray_s: float
    ray_start_s: float
    workers: int
    compute_s: float  # the tasks' own time, serial run
    queries: int  # counted queries of one run of the plan
    identical: bool
    spans: tuple[float, float, float] = (0.0, 0.0, 0.0)  # first claim to last completion, per executor

    @property
    def span_speedup(self) -> float:
        """Serial / local span: the speedup without the workers' start (imports, model load)."""
        return self.spans[0] / self.spans[1] if self.spans[1] else 0.0

    @property
    def speedup(self) -> float:
        return self.serial_s / self.local_s

    @property
    def ray_speedup(self) -> float:
        return self.serial_s / self.ray_s

    @property
    def ray_overhead_per_task_s(self) -> float:
        return (self.ray_s * self.workers - self.compute_s) / (self.shards + 1)

    @property
    def seconds_per_query(self) -> float:
        return self.compute_s / max(self.queries, 1)

    @property
    def papers_hours(self) -> float:
        return PAPERS_QUERIES * self.seconds_per_query / 3600

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "speedup": self.speedup,
            "span_speedup": self.span_speedup,
            "ray_speedup": self.ray_speedup,
            "ray_overhead_per_task_s": self.ray_overhead_per_task_s,
            "seconds_per_query": self.seconds_per_query,
            "papers_queries": PAPERS_QUERIES,
            "papers_hours": self.papers_hours,
        }


def bench_sweep(
    *,
    model: str = "mnist-cnn",
    shards: int = 16,
    shard_size: int = 5,
    budget: int = 200,
    defense: str = "RND:std=0.05",
    workers: int = 2,
    device: str = "cpu",
    cache_dir: str | None = None,
    log=None,  # noqa: ANN001 - Callable[[str], None] | None
) -> SweepBench:
    """Run the bench plan three ways (see the module docstring)."""
    import ray

    from ..evaluation.store import ResultStore
    from ..sweep import parse_plan, run_sweep

    say = log or (lambda _msg: None)
    images = shards * shard_size
    plan = parse_plan(
        f'models = ["{model}"]\ndefenses = ["{defense}"]\nattacks = ["square"]\nbudgets = [{budget}]\n'
        f"images = {images}\nshard_size = {shard_size}\nconfirm = 0\n",
        source="bench",
        name="bench",
    )
    folder = Path(tempfile.mkdtemp(prefix="sinai-bench-sweep."))
    kw = dict(device=device, cache_dir=cache_dir)
    say(f"{model}, {defense}, Square {budget} queries, {shards} shards of {shard_size} images")
    _, serial = run_sweep(plan, store=str(folder / "serial.sqlite"), workers=1, **kw)
    say(f"serial: {serial.seconds:.1f} s")
    _, local = run_sweep(plan, store=str(folder / "local.sqlite"), workers=workers, **kw)
    say(f"{workers} local workers: {local.seconds:.1f} s")
    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
             log_to_driver=False)  # fmt: skip
    ray_start = time.perf_counter() - start
    try:
        _, on_ray = run_sweep(plan, store=str(folder / "ray.sqlite"), executor="ray", workers=workers, **kw)
    finally:
        ray.shutdown()
    say(f"{workers} Ray workers: {on_ray.seconds:.1f} s (+{ray_start:.1f} s to start Ray)")
    numbers, compute, queries, spans = [], 0.0, 0, []
    for name in ("serial", "local", "ray"):
        with ResultStore(folder / f"{name}.sqlite") as db:
            (run_id, _, _), *_ = db.runs()
            numbers.append((db.clean(run_id), db.results(run_id)))
            tasks = db.tasks()
            spans.append(max(t.finished for t in tasks) - min(t.claimed for t in tasks))
            if name == "serial":
                compute = sum(t.seconds or 0.0 for t in db.tasks())
                queries = sum(r.queries for r in numbers[0][1])
    for name in ("serial", "local", "ray"):
        os.remove(folder / f"{name}.sqlite")
    folder.rmdir()
    return SweepBench(
        model, shards, images, budget, serial.seconds, local.seconds, on_ray.seconds, ray_start, workers,
        compute, queries, numbers[0] == numbers[1] == numbers[2], tuple(spans),
    )  # fmt: skip


def bench_table(b: SweepBench) -> str:
    rows = [
        ("serial (1 process)", b.serial_s, 1.0),
        (f"local, {b.workers} workers", b.local_s, b.speedup),
        (f"ray, {b.workers} workers", b.ray_s, b.ray_speedup),
    ]
    lines = [f"{'executor':<22} {'wall s':>8} {'speedup':>8} {'tasks span s':>13}"]
    for (name, s, x), span in zip(rows, b.spans, strict=True):
        lines.append(f"{name:<22} {s:>8.1f} {x:>7.2f}x {span:>13.1f}")
    lines.append(
        f"speedup with {b.workers} local workers {b.speedup:.2f}x wall, {b.span_speedup:.2f}x from the first "
        f"claim to the last result (target >= 1.7x on 2 free cores); Ray: "
        f"{b.ray_overhead_per_task_s:.2f} s overhead per task, {b.ray_start_s:.1f} s to start a local cluster"
    )
    lines.append(f"identical numbers across executors: {'yes' if b.identical else 'NO'}")
    lines.append(
        f"cost {1e3 * b.seconds_per_query:.3f} ms per counted query ({b.queries} queries, "
        f"{b.compute_s:.1f} s of tasks) -> the papers' protocol ({PAPERS_QUERIES:.2e} queries at most) "
        f"needs <= {b.papers_hours:,.0f} hours of this model on this device"
    )
    return "\n".join(lines)
