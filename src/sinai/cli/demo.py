"""``sinai demo``: the main job on the embedded MNIST default (see :mod:`sinai.demo`)."""

from __future__ import annotations

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
@seed_option()
@out_option("runs/demo")
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
    out: str,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """The main job on the embedded MNIST default: calibrate, tune, attack, report (resumable)."""
    from ..demo import run_demo
    from ..reports.console import paper_tables

    start = time.perf_counter()

    def log(message: str) -> None:
        click.echo(f"[{time.perf_counter() - start:6.0f} s] {message}", err=True)

    result = run_demo(
        out=Path(out), quick=quick, eval_images=images, budget=budget, trials=trials, attacks=attacks,
        models=models, trained=trained, seed=seed, device=device, cache_dir=cache_dir, log=log,
    )  # fmt: skip
    threat = result.threat
    note = f" (robust accuracy %, {result.images} images, {threat.norm} eps {threat.eps})"
    click.echo(paper_tables(result.report.tables, note))
    log(f"done; report in {Path(out) / 'report'} ({len(result.report.files)} files)")
