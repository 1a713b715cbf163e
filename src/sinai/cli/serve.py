"""``sinai serve``: a defended model behind an HTTP API; ``sinai serve keys``: its API key file."""

from __future__ import annotations

import click
import torch

from .options import device_options, model_option, weights_option


@click.group("serve", invoke_without_command=True)
@model_option("mnist-cnn")
@click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="State-dict file.")
@weights_option()
@click.option("--num-classes", type=int, default=None, help="Head size of timm/torchvision models.")
@click.option(
    "--defense",
    default="none",
    show_default=True,
    help="Preset or composition, e.g. RND:std=0.05; its noise is drawn from OS entropy on every forward.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--output",
    type=click.Choice(["probs", "logits", "labels", "topk"]),
    default="probs",
    show_default=True,
    help="What /v1/predict answers (labels: a decision-based endpoint).",
)
@click.option("--topk", type=int, default=5, show_default=True, help="k of --output topk.")
@click.option("--max-batch", type=int, default=256, show_default=True, help="Images per request.")
@click.option("--max-bytes", type=int, default=32 * 2**20, show_default=True, help="Request body size limit.")
@click.option(
    "--batching/--no-batching",
    default=True,
    show_default=True,
    help="Group concurrent requests into one forward (dynamic batching).",
)
@click.option(
    "--batch-wait-ms",
    type=float,
    default=2.0,
    show_default=True,
    help="Longest wait for more requests once one is queued.",
)
@click.option("--max-batch-forward", type=int, default=256, show_default=True, help="Images per forward.")
@click.option(
    "--api-keys",
    type=click.Path(dir_okay=False),
    default=None,
    help="Key file (JSON, keys stored hashed; `sinai serve keys add`): requests need a key.",
)
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without --api-keys.")
@click.option(
    "--detect",
    default="none",
    show_default=True,
    help="Stateful detection: 'blacklight' or 'blacklight:window=W,hashes=N,match=M,history=H' (per key).",
)
@click.option(
    "--detect-policy",
    type=click.Choice(["flag", "reject", "ban"]),
    default="flag",
    show_default=True,
    help="A flagged query: answered and counted (flag), refused with 403 (reject), or the key banned (ban).",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Run the app under Ray Serve with N replicas (0: one uvicorn process, no Ray).",
)
@click.option("--replica-cpus", type=float, default=1.0, show_default=True, help="CPUs per Ray replica.")
@click.option(
    "--ray-address", default=None, help="Join this Ray cluster (e.g. auto) instead of starting a local one."
)
@click.option("--log-level", default="warning", show_default=True, help="uvicorn log level.")
@device_options
@click.pass_context
def serve(
    ctx: click.Context,
    model_name: str,
    checkpoint: str | None,
    weights: str,
    num_classes: int | None,
    defense: str,
    host: str,
    port: int,
    output: str,
    topk: int,
    max_batch: int,
    max_bytes: int,
    batching: bool,
    batch_wait_ms: float,
    max_batch_forward: int,
    api_keys: str | None,
    insecure: bool,
    detect: str,
    detect_policy: str,
    replicas: int,
    replica_cpus: float,
    ray_address: str | None,
    log_level: str,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """Serve a defended model: POST /v1/predict, GET /v1/info, /v1/usage, /healthz, /metrics.

    \b
    sinai serve --model mnist-cnn --defense RND:std=0.05
    sinai serve keys add --file keys.json --name alice --budget 100000 --rate 200
    sinai serve --model mnist-cnn --defense RND:std=0.05 --api-keys keys.json
    """
    if ctx.invoked_subcommand is not None:
        return
    from ..serving import ServeConfig, create_app
    from ..serving import serve as run_server

    config = ServeConfig(
        model=model_name, defense=defense, host=host, port=port, output=output, topk=topk,
        max_batch=max_batch, max_bytes=max_bytes, batching=batching, batch_wait_ms=batch_wait_ms,
        max_batch_forward=max_batch_forward, api_keys=api_keys, insecure=insecure, device=str(device),
        cache_dir=cache_dir, checkpoint=checkpoint, weights=weights, num_classes=num_classes,
        log_level=log_level, detect=detect, detect_policy=detect_policy,
    )  # fmt: skip
    if replicas:
        from ..serving.replicas import run as run_replicas

        click.echo(
            f"sinai serve: {model_name} with {config.defense_text} on http://{host}:{port} under Ray Serve, "
            f"{replicas} replicas of {replica_cpus:g} CPUs (usage, detection and metrics per replica)",
            err=True,
        )
        run_replicas(config, replicas=replicas, num_cpus=replica_cpus, address=ray_address)
        return
    app = create_app(config)
    state = app.state.sinai
    keys = f"{len(state.keys)} API keys from {config.api_keys}" if state.keys else "no API keys"
    if config.detect is not None:
        keys += f", detection {config.detect.describe()} policy {detect_policy}"
    click.echo(
        f"sinai serve: {model_name} with {config.defense_text} on http://{host}:{port} "
        f"(output {output}, {keys}, batching {'on' if batching else 'off'}, device {device})",
        err=True,
    )
    run_server(config, app)


@serve.group("keys")
def keys() -> None:
    """Manage an API key file (keys are stored as SHA-256 hashes; a new key is printed once)."""


_FILE = click.option("--file", "path", type=click.Path(dir_okay=False), required=True, help="The key file.")


@keys.command("add")
@_FILE
@click.option("--name", required=True, help="Who the key is for (shown in /v1/usage).")
@click.option("--budget", type=int, default=None, help="Queries (images) the key may send in all.")
@click.option("--rate", type=float, default=None, help="Queries per second (token bucket).")
@click.option("--burst", type=int, default=None, help="Bucket size (default: max(rate, --max-batch)).")
def keys_add(path: str, name: str, budget: int | None, rate: float | None, burst: int | None) -> None:
    """Add a key to FILE (created if missing) and print it: it is not stored, only its hash."""
    from ..serving.keys import add_key

    key = add_key(path, name, budget=budget, rate=rate, burst=burst)
    click.echo(key)
    click.echo(f"added key {name!r} to {path}; keep it now, only its SHA-256 is stored", err=True)


@keys.command("list")
@_FILE
def keys_list(path: str) -> None:
    """List the keys of FILE (names and limits; the keys themselves are not stored)."""
    from ..serving.keys import read_keys

    for e in read_keys(path):
        click.echo(
            f"{e.name}\tbudget={e.budget if e.budget is not None else 'unlimited'}\t"
            f"rate={e.rate if e.rate is not None else 'unlimited'}\tburst={e.burst or 'default'}\t{e.created}"
        )


@keys.command("remove")
@_FILE
@click.option("--name", required=True, help="The name the key was added with.")
def keys_remove(path: str, name: str) -> None:
    """Remove the key called NAME from FILE."""
    from ..serving.keys import remove_key

    remove_key(path, name)
    click.echo(f"removed key {name!r} from {path}", err=True)
