"""``sinai demo``: the main job on the embedded MNIST default (see :mod:`sinai.demo`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
import torch

from .options import device_options, names, out_option, parsed, seed_option


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes: a smoke test of every stage (about 3 minutes).")
@click.option(
    "--images", type=int, default=None, help="Evaluation images per model (default 50, both sizes)."
)
@click.option("--budget", type=int, default=None, help="Queries per image (default 1000; --quick 200).")
@click.option("--trials", type=int, default=None, help="NSGA-II trials per model (default 12; --quick 4).")
@click.option(
    "--attacks",
    default=None,
    callback=parsed(names),
    help="Comma-separated attacks of the table (default square,signhunter,nes,rays,signflip,transfer; "
    "transfer crafts Square on the undefended model and judges it on each defense).",
)
@click.option(
    "--models",
    default=None,
    callback=parsed(names),
    help="Comma-separated embedded models (default mnist-cnn,mnist-vit). Two demos with different "
    "--models may share one --out and run side by side.",
)
@click.option(
    "--trained",
    is_flag=True,
    help="Add the trained defenses of the CNN: MFDV-SNN (mnist-cnn-mfdv, preset MFDV) and SINAI-selective "
    "(mnist-cnn-selective at r = 0.9), each trained once (about a minute) and cached.",
)
@seed_option("Seed of everything: images, noise, attacks, tuning.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None,
    help="Worker processes, one torch thread each (default: the CPU count, at most 4); with --executor "
    "ray and no --address, the CPUs of the local Ray cluster. The numbers do not depend on it.",
)  # fmt: skip
@click.option(
    "--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
    help="local: worker processes on this machine; ray: Ray core tasks (see `sinai sweep`).",
)  # fmt: skip
@click.option("--address", default=None, help="Ray cluster to join with --executor ray (HOST:PORT or auto).")
@click.option(
    "--plan", "print_plan", is_flag=True, help="Print the demo's built-in sweep plan (TOML) and exit."
)
@out_option("runs/demo", "Output folder: results.sqlite (resumed), calibration, tuning, report.")
@device_options
def demo(
    quick: bool,
    images: int | None,
    budget: int | None,
    trials: int | None,
    attacks: tuple[str, ...] | None,
    models: tuple[str, ...] | None,
    trained: bool,
    seed: int,
    workers: int | None,
    executor: str,
    address: str | None,
    print_plan: bool,
    out: str,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """The main job on the embedded MNIST default: calibrate, tune, attack, report (resumable).

    It is a built-in sweep plan (``--plan`` prints it) run by the machinery of ``sinai sweep``."""
    from ..demo import demo_plan, run_demo
    from ..reports.console import paper_tables

    sizes = dict(quick=quick, eval_images=images, budget=budget, trials=trials, attacks=attacks,
                 models=models, trained=trained, seed=seed)  # fmt: skip
    if print_plan:
        click.echo(demo_plan(**sizes), nl=False)
        return
    start = time.perf_counter()

    def log(message: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.0f} s] {message}", err=True)

    workers = workers or max(1, min(4, os.cpu_count() or 1))
    try:
        result = run_demo(
            out=Path(out), **sizes, executor=executor, workers=workers, address=address, device=device,
            cache_dir=cache_dir, log=log,
        )  # fmt: skip
    except RuntimeError as err:  # tasks that failed every retry: the message says which, and how to retry
        raise click.ClickException(str(err)) from err
    threat = result.threat
    note = f" (robust accuracy %, {result.images} images, {threat.norm} eps {threat.eps})"
    click.echo(paper_tables(result.report.tables, note))
    log(f"done; report in {Path(out) / 'report'} ({len(result.report.files)} files)")
