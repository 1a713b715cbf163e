"""``sinai sweep PLAN.toml``: a plan run as a ledger of (run, shard) tasks; ``status`` and ``report``."""

from __future__ import annotations

import time
from pathlib import Path

import click

COMMANDS = ("run", "status", "report")


class _PlanGroup(click.Group):
    """``sinai sweep PLAN.toml ...`` is ``sinai sweep run PLAN.toml ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in COMMANDS and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


store_option = click.option(
    "--store",
    default=None,
    help="Result store: a SQLite file or postgresql://USER@HOST:PORT/DB (default: the plan's store, else "
    "OUT/results.sqlite with the plan's out, default runs/sweep/NAME).",
)


@click.group(cls=_PlanGroup)
def sweep() -> None:
    """Run a plan of models x defenses x attacks as (run, shard) tasks in the result store (a ledger):
    `sinai sweep PLAN.toml`, `sinai sweep status PLAN.toml`, `sinai sweep report PLAN.toml`."""


@sweep.command("run")
@click.argument("plan_file", metavar="PLAN.toml", type=click.Path(dir_okay=False))
@store_option
@click.option(
    "--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
    help="local: this process (--workers 1) or a pool of worker processes; ray: Ray core tasks.",
)  # fmt: skip
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Local worker processes (one torch thread each); for ray without --address, the CPUs of the "
    "local Ray cluster.",
)  # fmt: skip
@click.option("--address", default=None, help="Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto).")
@click.option(
    "--retries", type=click.IntRange(min=1), default=3, show_default=True, help="Attempts per task."
)
@click.option(
    "--lease", type=float, default=120, show_default=True,
    help="Seconds without a heartbeat after which another worker takes a running task over.",
)  # fmt: skip
@click.option(
    "--device", default="auto", show_default=True, help="Device of every worker: cpu, cuda or auto."
)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Embedded model cache.")
def run_command(
    plan_file: str, store: str | None, executor: str, workers: int, address: str | None, retries: int,
    lease: float, device: str, cache_dir: str | None,
) -> None:  # fmt: skip
    """Run what is missing of PLAN.toml and print its status (exit code 1 if tasks failed)."""
    from ..sweep import load_plan, run_sweep, status_table

    start = time.perf_counter()

    def log(message: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.0f} s] {message}", err=True)

    plan = load_plan(plan_file)
    status, outcome = run_sweep(
        plan, store=store, executor=executor, workers=workers, address=address, device=device,
        cache_dir=cache_dir, retries=retries, lease=lease, log=log,
    )  # fmt: skip
    log(
        f"{executor} executor, {workers} worker(s): {outcome.done} tasks done, {outcome.failed} failed"
        + (f", {outcome.replaced} dead worker(s) replaced" if outcome.replaced else "")
        + f" in {outcome.seconds:.1f} s"
    )
    click.echo(status_table(status))
    failed = [r for r in status.runs if r.failed]
    if failed:
        raise click.ClickException(
            f"{sum(r.failed for r in failed)} task(s) failed (see `sinai sweep status`); re-run to retry them"
        )


@sweep.command("status")
@click.argument("plan_file", metavar="PLAN.toml", type=click.Path(dir_okay=False))
@store_option
def status_command(plan_file: str, store: str | None) -> None:
    """Progress of PLAN.toml per run (tasks done/running/failed, seconds per shard, robust accuracy so
    far) and the ETA at the current number of workers."""
    from ..sweep import load_plan, status_table, sweep_status

    click.echo(status_table(sweep_status(load_plan(plan_file), store=store)))


@sweep.command("report")
@click.argument("plan_file", metavar="PLAN.toml", type=click.Path(dir_okay=False))
@store_option
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: the plan's out folder.")
def report_command(plan_file: str, store: str | None, out: str | None) -> None:
    """The papers' tables from the plan's store (`sinai report OUT` reads a SQLite store directly; a
    PostgreSQL store is first copied into OUT/results.sqlite)."""
    from ..evaluation.store import is_postgres
    from ..reports.console import paper_tables
    from ..reports.report import make_report
    from ..sweep import load_plan, snapshot

    plan = load_plan(plan_file)
    location = store or plan.default_store()
    folder = Path(out or plan.out or f"runs/sweep/{plan.name}")
    if is_postgres(location):
        click.echo(f"copied to {snapshot(plan, location, str(folder))}", err=True)
    elif Path(location).resolve().parent != folder.resolve():
        folder = Path(location).parent
    result = make_report(folder)
    click.echo(paper_tables(result.tables))
    click.echo("\nwritten: " + ", ".join(str(f) for f in result.files), err=True)
