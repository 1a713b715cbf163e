"""``sinai sites`` and ``sinai train``: a model's noise sites, and the embedded MNIST models."""

from __future__ import annotations

import json

import click
import torch

from .options import device_options, model_option, weights_option


@click.command()
@model_option("mnist-vit")
@weights_option("random", help="Sites do not depend on weights; random avoids needing them.")
@device_options
def sites(model_name: str, weights: str, device: torch.device, cache_dir: str | None) -> None:
    """List the noise sites of a model by kind (what protect() would hook)."""
    from ..defenses import describe_sites
    from ..models.embedded import EMBEDDED, build_embedded
    from ..models.zoo import load_model

    if model_name in EMBEDDED:  # sites do not depend on weights: no need to train
        model = build_embedded(model_name)
    else:
        model = load_model(model_name, weights=weights, device=device, cache_dir=cache_dir)
    for kind, found in describe_sites(model).items():
        shown = ", ".join(found[:6]) + (f", ... ({len(found)} in all)" if len(found) > 6 else "")
        click.echo(f"{kind:8s} {len(found):3d}  {shown or '-'}")


@click.command()
@click.argument("name", type=click.Choice(["mnist-cnn", "mnist-vit"]))
@click.option("--retrain", is_flag=True, help="Train again even if a cached model exists.")
@device_options
def train(name: str, retrain: bool, device: torch.device, cache_dir: str | None) -> None:
    """Train (or load from the cache) an embedded MNIST model and print its test accuracy."""
    from ..models.embedded import cache_path, embedded_metrics, load_embedded

    load_embedded(name, cache_dir=cache_dir, device=device, retrain=retrain)
    metrics = embedded_metrics(name, cache_dir=cache_dir) or {}
    click.echo(f"{name}: {cache_path(name, cache_dir)}")
    click.echo(json.dumps(metrics, indent=2, sort_keys=True))
