"""``sinai check``: gradient-masking checks of a (defended) model (:mod:`sinai.analysis.masking`)."""

from __future__ import annotations

from pathlib import Path

import click

from ..attacks.threat import NORMS
from .options import ModelSource, load_model_and_images, model_options, out_option, seed_option


@click.command("check")
@click.argument("defense")
@model_options(default="mnist-cnn")
@click.option("--images", type=int, default=100, show_default=True, help="N images, covering every class.")
@click.option(
    "--norm", type=click.Choice(NORMS), default="linf", show_default=True,
    help="Threat model: the norm of the eps-ball around each image.",
)  # fmt: skip
@click.option(
    "--eps",
    type=float,
    default=None,
    help="Threat-model radius in [0, 1] pixel units (default per dataset/model, as sinai eval).",
)
@click.option(
    "--eot", type=int, default=10, show_default=True, help="M of the EOT check: noisy forwards per gradient."
)
@click.option("--steps", type=int, default=20, show_default=True, help="PGD steps of every PGD run.")
@click.option(
    "--more-steps", type=int, default=100, show_default=True, help="PGD steps of the more-steps check."
)
@click.option("--queries", type=int, default=1000, show_default=True, help="Square's queries per image.")
@click.option(
    "--bpda", is_flag=True, help="White-box runs pass gradients straight through non-smooth steps (BPDA)."
)
@seed_option("Image selection, noise and attack seed.")
@out_option("runs/check", "Output folder; results.sqlite there is resumed when the settings match.")
def check(
    defense: str, source: ModelSource, images: int, norm: str, eps: float | None, eot: int, steps: int,
    more_steps: int, queries: int, bpda: bool, seed: int, out: str,
) -> None:  # fmt: skip
    """Gradient-masking checks of DEFENSE (as sinai eval --defense, e.g. none, RND:std=0.05) on --model.

    Runs FGSM, PGD, Square, a transfer attack from the undefended model, PGD at growing eps, EOT-PGD and
    a longer PGD through the deployed defense and prints, per check, pass or warn with the robust
    accuracies compared (95% Wilson intervals) and the paired sign test (Athalye et al. 2018; Carlini
    et al. 2019). Warnings are findings: the command exits 0.
    """
    from ..analysis.masking import STAGE, check_masking, checks_table
    from ..attacks import ThreatModel
    from ..defenses import parse_defense
    from ..evaluation.clean import clean_accuracy
    from ..evaluation.config import EvalConfig
    from ..evaluation.defaults import default_eps
    from ..evaluation.protocol import evaluate
    from ..evaluation.store import ResultStore

    parsed = parse_defense(defense)
    loaded = load_model_and_images(source, images, seed)
    threat = ThreatModel(norm, eps if eps is not None else default_eps(source.name, loaded.data, norm))
    describe = {"model": source.name, "checkpoint": source.checkpoint, "dataset": loaded.data, "stage": STAGE}
    with ResultStore(Path(out) / "results.sqlite") as store:
        results = check_masking(
            loaded.model, loaded.x, loaded.y, parsed, threat, store=store, seed=seed, eot=eot, steps=steps,
            more_steps=more_steps, queries=queries, bpda=bpda, describe=describe,
            dataset_indices=loaded.indices.tolist(), progress=True,
        )  # fmt: skip
        config = EvalConfig(defense=parsed, threat=threat, seed=seed, describe=describe)
        clean = evaluate(
            loaded.model, loaded.x, loaded.y, config, dataset_indices=loaded.indices.tolist(), store=store,
            progress=False,
        )  # fmt: skip
    base = clean_accuracy(loaded.model, loaded.x, loaded.y, passes=1).mean
    label = clean.config.defense.describe() if clean.config.defense.specs else "Base (no defense)"
    label += ", white-box runs with BPDA" if bpda else ""
    warned = [r.id for r in results if not r.passed]
    click.echo(
        f"{source.name}, {label}: {threat.norm} eps={threat.eps:g}, {len(loaded.x)} {loaded.data} images "
        f"(seed {seed}); clean {100 * clean.clean_mean:.1f}% (undefended {100 * base:.1f}%)"
    )
    click.echo(checks_table(results))
    click.echo(f"results in {out}/results.sqlite", err=True)
    click.echo(
        f"{len(results) - len(warned)} pass, {len(warned)} warn"
        + (f" ({', '.join(warned)})" if warned else "")
    )
