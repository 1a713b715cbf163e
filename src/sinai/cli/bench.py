"""``sinai bench``: performance ratios measured in one run (never absolute timings)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch

from .options import (
    ModelSource,
    device_options,
    model_option,
    names,
    parsed,
    precision_options,
    seed_option,
)

if TYPE_CHECKING:
    from ..bench.precision import Precision


@click.group()
def bench() -> None:
    """Performance ratios measured in one run (never absolute timings)."""


def _model_batches(text: str) -> list[tuple[str, int]]:
    """'mnist-cnn@8,timm:x' -> [('mnist-cnn', 8), ('timm:x', 64)]."""
    pairs = []
    for item in names(text) or ():
        name, _, batch = item.rpartition("@") if "@" in item else (item, "", "")
        try:
            pairs.append((name, int(batch) if batch else 64))
        except ValueError:
            raise ValueError(f"expected MODEL or MODEL@BATCH, got {item!r}") from None
        if pairs[-1][1] < 1:
            raise ValueError(f"the batch of {item!r} must be an integer >= 1 (images per timed forward)")
    return pairs


def _defense_names(text: str) -> tuple[str, ...]:
    """'RND,SINAI@threshold' -> ('RND', 'SINAI@threshold'), each checked to be a defense (an unknown
    name fails here, before any model is loaded)."""
    from ..bench.defenses import bench_defense

    found = names(text)
    if not found:
        raise ValueError(f"expected comma-separated defenses such as RND,SINAI, got {text!r}")
    for name in found:
        bench_defense(name)
    return found


@bench.command("defenses")
@click.option(
    "--models",
    default=None,
    callback=parsed(_model_batches),
    help="Comma-separated model[@batch] list (default: mnist-cnn@256, mnist-vit@256, "
    "torchvision:resnet18@16, timm:vit_tiny_patch16_224@16; ImageNet-shaped ones use random weights).",
)
@click.option(
    "--defenses",
    "defense_names",
    default=None,
    callback=parsed(_defense_names),
    help="Comma-separated presets; X@threshold = X with thresholds calibrated once.",
)
@click.option(
    "--rounds", type=int, default=7, show_default=True, help="Interleaved timing rounds (median taken)."
)
@click.option("--iters", type=int, default=3, show_default=True, help="Forwards per timing.")
@click.option(
    "--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON."
)
@click.option(
    "--large", is_flag=True,
    help="Also timm:vit_base_patch16_224@16 and timm:resnet50@16 (random weights; slow on a CPU).",
)  # fmt: skip
@precision_options
@device_options
def bench_defenses(
    models: list[tuple[str, int]] | None,
    defense_names: tuple[str, ...] | None,
    rounds: int,
    iters: int,
    json_out: str | None,
    large: bool,
    precision: Precision,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """Protected-forward / unprotected-forward time per preset, same model and batch (target <= 1.05x)."""
    from ..bench.defenses import BENCH_PRESETS, DEFAULT_MODELS, LARGE_MODELS, bench_models
    from ..reports.console import bench_defenses_table

    start = time.perf_counter()
    models = [*(models or DEFAULT_MODELS), *(LARGE_MODELS if large else ())]
    rows = bench_models(
        models, defense_names or BENCH_PRESETS, device=device, rounds=rounds, iters=iters,
        cache_dir=cache_dir, precision=precision,
    )  # fmt: skip
    if not rows:
        raise ValueError(
            f"none of the defenses {', '.join(defense_names or BENCH_PRESETS)} has sites in the models "
            f"{', '.join(name for name, _ in models)}; pick defenses these models have "
            "(sinai sites --model M)"
        )
    click.echo(
        f"device {device}, {precision.describe()}, {torch.get_num_threads()} threads, "
        f"{rounds} rounds x {iters} forwards "
        f"({time.perf_counter() - start:.0f} s)"
    )
    click.echo(bench_defenses_table(rows))
    if json_out:
        Path(json_out).write_text(json.dumps([asdict(r) for r in rows], indent=2))


@bench.command("attacks")
@model_option("mnist-cnn")
@click.option(
    "--attacks",
    "attack_names",
    default=None,
    callback=parsed(names),
    help="Comma-separated attacks (default: the query attacks, score- and decision-based). Any registered "
    "attack can be named, white-box and transfer ones too, but their ratio says little: their time goes "
    "into gradients or a surrogate, not into counted queries.",
)
@click.option("--images", type=int, default=100, show_default=True, help="Images attacked per attack.")
@click.option("--budget", type=int, default=200, show_default=True, help="Queries per image for the ratio.")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Forward chunk size.")
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Interleaved timings per attack (forward rate, then the attack) and per Square peer; "
    "medians are reported. The HopSkipJump peers run once.",
)
@click.option(
    "--peers",
    is_flag=True,
    help="Also compare Square with torchattacks and ART, and HopSkipJump with ART and foolbox "
    "(pip install sinai[peers]).",
)
@click.option(
    "--peer-images", type=int, default=200, show_default=True, help="Images of the Square peer comparison."
)
@click.option(
    "--peer-eps", type=float, default=0.3, show_default=True,
    help="linf radius of the Square peer comparison, in [0, 1] pixel units.",
)  # fmt: skip
@click.option(
    "--peer-budget", type=int, default=1000, show_default=True, help="Queries per image of the Square peers."
)
@click.option(
    "--hsja-images",
    type=int,
    default=50,
    show_default=True,
    help="Images of the HopSkipJump peer comparison.",
)
@click.option(
    "--hsja-iters", type=int, default=10, show_default=True, help="HopSkipJump iterations (all tools)."
)
@click.option(
    "--large", is_flag=True,
    help="Also timm:vit_base_patch16_224 and timm:resnet50 (random weights, random images labelled by "
    "the model, batch 16; --large-images, --large-budget): slow on a CPU.",
)  # fmt: skip
@click.option("--large-images", type=int, default=16, show_default=True, help="Images per --large model.")
@click.option("--large-budget", type=int, default=50, show_default=True, help="Queries per image on --large.")
@click.option(
    "--json-out", type=click.Path(dir_okay=False), default=None,
    help="Also write every table as JSON: the rows (and the --large and --peers rows) with the settings.",
)  # fmt: skip
@seed_option("Image selection and attack seed.")
@device_options
def bench_attacks(
    model_name: str,
    attack_names: tuple[str, ...] | None,
    images: int,
    budget: int,
    batch_size: int,
    rounds: int,
    peers: bool,
    peer_images: int,
    peer_eps: float,
    peer_budget: int,
    hsja_images: int,
    hsja_iters: int,
    large: bool,
    large_images: int,
    large_budget: int,
    json_out: str | None,
    seed: int,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """Queries/s of each attack / the model's forward images/s (target >= 0.9); --peers: Square and
    HopSkipJump vs torchattacks, ART and foolbox."""
    from ..bench.attacks import QUERY_ATTACKS, compare_hsja, compare_square, measure_attacks
    from ..models.data import sample
    from ..reports.console import bench_attacks_table, peers_table

    model, _, dataset = ModelSource(model_name, device, cache_dir).load()

    def images_on_device(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sample(dataset, n, seed)
        return x.to(device), y.to(device)

    rows = measure_attacks(
        model, *images_on_device(images), attack_names or QUERY_ATTACKS, budget=budget, batch_size=batch_size,
        rounds=rounds, seed=seed,
    )  # fmt: skip
    click.echo(
        f"{model_name}, {images} images, budget {budget}, batch {batch_size}, device {device}; "
        f"medians of {rounds} rounds. ratio = queries/s / forward images/s (target >= 0.9); "
        "forward_share = fraction of the attack's time inside the model"
    )
    click.echo(bench_attacks_table(rows))
    payload: dict[str, object] = {
        "model": model_name, "device": str(device), "images": images, "budget": budget,
        "batch_size": batch_size, "rounds": rounds, "seed": seed, "rows": [asdict(r) for r in rows],
    }  # fmt: skip

    def write_json() -> None:
        if json_out:
            Path(json_out).write_text(json.dumps(payload, indent=2) + "\n")

    if large:
        from ..bench.attacks import random_weight_setup
        from ..bench.defenses import LARGE_MODELS

        payload["large"] = {}
        for name, batch in LARGE_MODELS:
            big, bx, by = random_weight_setup(
                name, large_images, device=device, cache_dir=cache_dir, seed=seed
            )
            big_rows = measure_attacks(
                big, bx, by, attack_names or QUERY_ATTACKS, budget=large_budget, batch_size=batch,
                rounds=rounds, seed=seed,
            )  # fmt: skip
            click.echo(
                f"\n{name} (random weights), {large_images} images, budget {large_budget}, batch {batch}:"
            )
            click.echo(bench_attacks_table(big_rows))
            payload["large"][name] = {
                "images": large_images, "budget": large_budget, "batch_size": batch,
                "rows": [asdict(r) for r in big_rows],
            }  # fmt: skip
    if not peers:
        write_json()
        return
    peer_rows = compare_square(
        model, *images_on_device(peer_images), eps=peer_eps, budget=peer_budget, batch_size=batch_size,
        rounds=rounds, seed=seed,
    )  # fmt: skip
    click.echo(
        f"\nSquare linf eps={peer_eps}, {peer_budget} queries, {peer_images} images, "
        f"median seconds of {rounds} rounds:"
    )
    click.echo(peers_table(peer_rows))
    hsja_rows = compare_hsja(
        model, *images_on_device(hsja_images), iterations=hsja_iters, batch_size=batch_size, seed=seed
    )
    click.echo(f"\nHopSkipJump l2 untargeted, {hsja_iters} iterations, {hsja_images} images:")
    click.echo(peers_table(hsja_rows, norms=True))
    payload["peers"] = {
        "square": {"images": peer_images, "eps": peer_eps, "budget": peer_budget,
                   "rows": [asdict(r) for r in peer_rows]},
        "hsja": {"images": hsja_images, "iterations": hsja_iters, "rows": [asdict(r) for r in hsja_rows]},
    }  # fmt: skip
    write_json()


def _counts(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers, got {text!r}")
    return values


@bench.command("serve")
@model_option("mnist-cnn")
@click.option("--defense", default="RND:std=0.05", show_default=True, help="The served defense.")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="Load per cell (bounded).")
@click.option(
    "--concurrency", "concurrencies", default="1,8,32", show_default=True, callback=parsed(_counts),
    help="Concurrent clients, comma-separated.",
)  # fmt: skip
@click.option(
    "--batches", default="1,64", show_default=True, callback=parsed(_counts), help="Images per request."
)
@click.option(
    "--batch-wait-ms", type=float, default=2.0, show_default=True,
    help="The server's longest wait for more requests once one is queued (as sinai serve).",
)  # fmt: skip
@click.option(
    "--max-batch-forward", type=int, default=256, show_default=True,
    help="The server's images per forward (as sinai serve).",
)  # fmt: skip
@click.option(
    "--in-process", is_flag=True, help="Serve from a thread of the bench process instead of a subprocess."
)
@click.option(
    "--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the cells as JSON."
)
@device_options
def bench_serve_command(
    model_name: str,
    defense: str,
    seconds: float,
    concurrencies: tuple[int, ...],
    batches: tuple[int, ...],
    batch_wait_ms: float,
    max_batch_forward: int,
    in_process: bool,
    json_out: str | None,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """Load test of `sinai serve` on loopback: requests/s, images/s, p50/p99 latency and errors per
    (concurrency, batch), batching on and off; ratios against the model's own forward."""
    import os

    from ..bench.serve import bench_serve, serve_table
    from ..models.zoo import load_model

    model = load_model(model_name, device=device, cache_dir=cache_dir)
    server_args = ["--device", str(device)] + (["--cache-dir", cache_dir] if cache_dir else [])
    start = time.perf_counter()
    result = bench_serve(
        model=model, model_name=model_name, defense=defense, seconds=seconds, concurrencies=concurrencies,
        batches=batches, server="thread" if in_process else "subprocess", server_args=server_args,
        batch_wait_ms=batch_wait_ms, max_batch_forward=max_batch_forward,
    )  # fmt: skip
    click.echo(
        f"{model_name} with {defense}, device {device}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs, server {'in-process' if in_process else 'subprocess'}, "
        f"{seconds:g} s per cell, "
        f".npy requests ({time.perf_counter() - start:.0f} s)"
    )
    click.echo(serve_table(result))
    if json_out:
        Path(json_out).write_text(
            json.dumps(
                {
                    "rows": [asdict(r) for r in result.rows],
                    "forward_images_per_s": result.forward_images_per_s,
                    "ratios": result.ratios(),
                },
                indent=2,
            )
        )


@bench.command("sweep")
@model_option("mnist-cnn")
@click.option(
    "--shards", type=click.IntRange(min=2), default=16, show_default=True, help="Shards of the plan."
)
@click.option(
    "--shard-size", type=click.IntRange(min=1), default=5, show_default=True, help="Images per shard."
)
@click.option("--budget", type=click.IntRange(min=1), default=200, show_default=True, help="Square queries.")
@click.option(
    "--workers", type=click.IntRange(min=2), default=2, show_default=True,
    help="Workers of the local pool and of Ray (compared with one worker).",
)  # fmt: skip
@click.option(
    "--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the numbers as JSON."
)
@device_options
def bench_sweep_command(
    model_name: str, shards: int, shard_size: int, budget: int, workers: int, json_out: str | None,
    device: torch.device, cache_dir: str | None,
) -> None:  # fmt: skip
    """One plan of CPU-bound shards serially, with N local workers and N Ray workers: speedup, Ray's
    overhead per task, and the papers' protocol in hours from the measured cost per query."""
    import os

    from ..bench.sweep import bench_sweep, bench_table

    result = bench_sweep(
        model=model_name, shards=shards, shard_size=shard_size, budget=budget, workers=workers,
        device=str(device), cache_dir=cache_dir, log=lambda m: click.echo(m, err=True),
    )  # fmt: skip
    click.echo(f"{os.cpu_count()} CPUs, device {device}, one torch thread per worker")
    click.echo(bench_table(result))
    if json_out:
        Path(json_out).write_text(json.dumps(result.as_dict(), indent=2))
