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
    from ..models.embedded import build_embedded, is_embedded
    from ..models.zoo import load_model

    if is_embedded(model_name):  # sites do not depend on weights: no need to train
        model = build_embedded(model_name)
    else:
        model = load_model(model_name, weights=weights, device=device, cache_dir=cache_dir)
    for kind, found in describe_sites(model, how=True).items():  # name [hook ...] or [intercepted ...]
        shown = ", ".join(found[:6]) + (f", ... ({len(found)} in all)" if len(found) > 6 else "")
        click.echo(f"{kind:8s} {len(found):3d}  {shown or '-'}")


TRAIN_HELP = """Train (or load from the cache) an embedded MNIST model and print its test accuracy.

\b
NAME is mnist-cnn, mnist-vit, mnist-cnn-at[:eps=E,steps=S,alpha=A],
mnist-cnn-surrogate, mnist-cnn-mfdv[:lambda1=L], mnist-vit-mfdv[:lambda1=L]
or mnist-cnn-selective[:k=K].

\b
sinai train mnist-cnn --adv pgd
    PGD adversarial training (Madry et al. 2018) of mnist-cnn: the model
    mnist-cnn-at (linf eps 0.1, 10 steps, alpha 2.5*eps/steps).
sinai train mnist-cnn --adv pgd --eps 0.2 --steps 20
    Another recipe: the model mnist-cnn-at:eps=0.2,steps=20.
sinai train mnist-cnn --surrogate
    The surrogate mnist-cnn-surrogate for transfer attacks: a wider CNN
    trained on half of the train split, never on a test image.
sinai train mnist-cnn --mfdv [--lambda1 L]
    MFDV-SNN (seed 004): a learned per-dimension noise scale on the
    penultimate features; deploy it with --defense MFDV (or MFDV:mc=15).
sinai train mnist-cnn --selective [--k K]
    SINAI-selective (seed 001): a learned INT4 low-rank approximation of
    every convolution of mnist-cnn-at; deploy it with
    --defense SINAI-selective:ratio=0.9.

\b
Each recipe is its own cache file (eps, steps and alpha are in the cache
key), trained once. The command prints the training time (also stored in
the model's metrics) and the name to evaluate, e.g.
sinai eval --model mnist-cnn-at:eps=0.2

"""


@click.command(help=TRAIN_HELP)
@click.argument("name")
@click.option(
    "--adv",
    default=None,
    metavar="METHOD",
    help="Adversarial training: pgd (crafts each batch's PGD examples with torchattacks, on the model "
    "in eval mode).",
)
@click.option("--eps", type=float, default=None, help="linf radius of --adv training [default: 0.1].")
@click.option("--steps", type=int, default=None, help="PGD steps per batch of --adv training [default: 10].")
@click.option("--alpha", type=float, default=None, help="PGD step size [default: 2.5*eps/steps].")
@click.option("--surrogate", is_flag=True, help="Train NAME's surrogate (mnist-cnn -> mnist-cnn-surrogate).")
@click.option(
    "--mfdv", is_flag=True, help="MFDV-SNN: train NAME with a learned feature noise scale (mnist-cnn-mfdv)."
)
@click.option(
    "--lambda1",
    type=float,
    default=None,
    help="Weight of MFDV's -sum(log sigma) term (larger: more noise) [default: the registered recipe's].",
)
@click.option(
    "--selective",
    is_flag=True,
    help="SINAI-selective: learn the approximation of NAME's adversarially trained convolutions "
    "(mnist-cnn-selective).",
)
@click.option(
    "--k",
    "rank",
    type=int,
    default=None,
    help="Rows of SINAI-selective's random projection per layer [default: the registered recipe's].",
)
@click.option("--retrain", is_flag=True, help="Train again even if a cached model exists.")
@device_options
def train(
    name: str,
    adv: str | None,
    eps: float | None,
    steps: int | None,
    alpha: float | None,
    surrogate: bool,
    mfdv: bool,
    lambda1: float | None,
    selective: bool,
    rank: int | None,
    retrain: bool,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    from ..models.embedded import cache_path, embedded_metrics, load_embedded, training_method

    model_name = resolve_train_name(
        name, adv, eps, steps, alpha, surrogate, mfdv=mfdv, lambda1=lambda1, selective=selective, k=rank
    )
    path = cache_path(model_name, cache_dir)
    cached = path.is_file() and not retrain and embedded_metrics(model_name, cache_dir=cache_dir) is not None
    load_embedded(model_name, cache_dir=cache_dir, device=device, retrain=retrain)
    metrics = embedded_metrics(model_name, cache_dir=cache_dir) or {}
    seconds = metrics.get("train_seconds")
    what = "loaded from the cache, trained" if cached else "trained"
    recipe = metrics.get("adversarial_training")
    line = f"{model_name}: {what} in {seconds} s"
    method = training_method(model_name)
    if method is not None and not recipe:
        line += f" with {method.describe()}"
    if recipe:
        line += (
            f" with PGD-{recipe['steps']} adversarial training (linf eps {recipe['eps']:g}, "
            f"alpha {recipe['alpha']:g})"
        )
    line += f"; test accuracy {metrics.get('test_accuracy', float('nan')):.1%}"
    robust = metrics.get("robust_accuracy")
    if robust:
        line += (
            f", PGD-{robust['steps']} robust accuracy {robust['accuracy']:.1%} at linf {robust['eps']:g} "
            f"on {robust['images']} test images"
        )
    click.echo(line)
    click.echo(f"cache: {path}")
    click.echo(f"evaluate it with: sinai eval --model {model_name}")
    click.echo(json.dumps(metrics, indent=2, sort_keys=True))


def resolve_train_name(
    name: str,
    adv: str | None,
    eps: float | None,
    steps: int | None,
    alpha: float | None,
    surrogate: bool,
    *,
    mfdv: bool = False,
    lambda1: float | None = None,
    selective: bool = False,
    k: int | None = None,
) -> str:
    """The embedded model ``sinai train NAME [--adv M --eps E --steps S --alpha A | --surrogate | --mfdv
    --lambda1 L | --selective --k K]`` means, in canonical form; ``ValueError`` (one line) for a
    combination that means nothing."""
    from ..models.embedded import EMBEDDED, adversarial_name, embedded_name, surrogate_name, variant_name

    canonical = embedded_name(name)
    options = [f"--{o}" for o, v in (("eps", eps), ("steps", steps), ("alpha", alpha)) if v is not None]
    recipe = EMBEDDED[canonical.partition(":")[0]].train
    is_at = recipe.adv is not None
    chosen = [flag for flag, on in (("--adv", adv is not None), ("--surrogate", surrogate)) if on]
    chosen += [flag for flag, on in (("--mfdv", mfdv), ("--selective", selective)) if on]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} are different recipes: choose one")
    for flag, value, owner, on in (
        ("--lambda1", lambda1, "--mfdv", mfdv),
        ("--k", k, "--selective", selective),
    ):
        kind = owner[2:]
        if value is not None and not on and getattr(recipe, kind) is None:
            raise ValueError(f"{flag} is an option of {owner}: add {owner}")
    if (mfdv or selective) and options:
        raise ValueError(f"{', '.join(options)} are options of --adv pgd, not of {chosen[0]}")
    for kind, on, values in (("mfdv", mfdv, {"lambda1": lambda1}), ("selective", selective, {"k": k})):
        if on or getattr(recipe, kind) is not None:
            if options or adv is not None or surrogate:
                raise ValueError(f"{canonical} is a --{kind} model; it takes no --adv/--surrogate options")
            return variant_name(canonical, kind, **values)
    if surrogate:
        if adv is not None or options:
            raise ValueError(
                "--surrogate trains the registered surrogate; it takes no --adv/--eps/--steps/--alpha"
            )
        return surrogate_name(canonical)
    if adv is None and options and not is_at:
        raise ValueError(f"{', '.join(options)} set adversarial training: add --adv pgd")
    if adv is None and not is_at:
        return canonical
    return adversarial_name(canonical, adv or "pgd", eps=eps, steps=steps, alpha=alpha)
