"""``sinai eval``: one robust-accuracy run of a (defended) model, resumable from its result store."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

from ..attacks.threat import NORMS
from .options import (
    ModelSource,
    budgets,
    key_values,
    load_model_and_images,
    model_options,
    out_option,
    parsed,
    passes_option,
    seed_option,
)


@click.command("eval")
@model_options(default="mnist-cnn")
@click.option(
    "--defense",
    default="none",
    show_default=True,
    help="Preset or composition, e.g. RND:std=0.05 or 'SINAI:attn.std=1,gelu.std=0.1,gelu.ratio=0.7'.",
)
@click.option(
    "--attack",
    default="none",
    show_default=True,
    help="none (clean accuracy only); score-based: square, signhunter, nes, bandits, simba, simba-dct, "
    "square-aaa (Square that undoes AAA); "
    "decision-based (labels only): rays, signflip, hsja, boundary, signopt, geoda; white-box "
    "(gradients through the deployed defense): fgsm, pgd, mifgsm, eotpgd, cw (l2), autoattack, npixel "
    "(l2); transfer (crafted on a source model, judged on the target).",
)
@click.option(
    "--attack-args",
    default="",
    callback=parsed(key_values),
    help="Attack hyper-parameters, e.g. 'p_init=0.1', 'steps=20,alpha=0.01' or, for transfer, "
    "'source=base|MODEL|CHECKPOINT,attack=square|pgd,queries=1000'.",
)
@click.option("--norm", type=click.Choice(NORMS), default="linf", show_default=True)
@click.option(
    "--eps",
    type=float,
    default=None,
    help="Threat-model radius in [0, 1] pixel units (default per dataset/model, see README).",
)
@click.option(
    "--budget",
    "budget_list",
    default="1000,10000",
    show_default=True,
    callback=parsed(budgets),
    help="Query budgets to report, comma-separated; one run with the largest.",
)
@click.option("--images", type=int, default=1000, show_default=True, help="N images, covering every class.")
@passes_option
@click.option(
    "--eot",
    type=int,
    default=1,
    show_default=True,
    help="Adaptive attack with M samples per query, each counted: EOT (mean scores) for score-based "
    "attacks, T-query majority label for decision-based ones; white-box attacks average M noisy "
    "forwards per gradient (EOT).",
)
@click.option(
    "--bpda",
    is_flag=True,
    help="White-box attacks pass gradients straight through the defense's non-smooth steps (BPDA; "
    "e.g. AAA's logit optimisation).",
)
@click.option(
    "--p-mis",
    "p_mis",
    is_flag=True,
    help="Also measure P_mis: the share of queries labelled unlike the noise-free model (SND Table 5; "
    "one extra uncounted noise-free forward per query).",
)
@click.option(
    "--votes",
    type=int,
    default=9,
    show_default=True,
    help="Uncounted passes that confirm a success on a randomized model: the fixed rule's majority, or the "
    "sequential vote's block size (0: the query itself decides).",
)
@click.option("--lucky", is_flag=True, help="Decide success by the single query (RFD Table 15).")
@click.option(
    "--vote-rule",
    type=click.Choice(["sequential", "fixed"]),
    default="sequential",
    show_default=True,
    help="sequential: the chance of accepting a candidate misclassified at most --vote-rate of the time "
    "stays below --vote-alpha over the whole attack; fixed: the papers' majority of --votes passes.",
)
@click.option("--vote-alpha", type=float, default=0.01, show_default=True, help="Sequential vote's level.")
@click.option(
    "--vote-rate", type=float, default=0.5, show_default=True, help="Misclassification rate it must beat."
)
@click.option(
    "--confirm",
    type=int,
    default=101,
    show_default=True,
    help="Fresh uncounted passes re-checking every returned adversarial example (0 = none).",
)
@click.option("--batch-size", type=int, default=128, show_default=True, help="Forward chunk size.")
@click.option(
    "--shard-size",
    type=int,
    default=100,
    show_default=True,
    help="Images attacked together and saved as one unit.",
)
@click.option(
    "--target",
    default=None,
    help="Attack a sinai endpoint (http://HOST:PORT, `sinai serve`) instead of --model: its defense is "
    "the server's; every query, vote and clean pass is a real, charged request.",
)
@click.option("--api-key", default=None, envvar="SINAI_API_KEY", help="Key for --target (or $SINAI_API_KEY).")
@seed_option("Image selection, noise and attack seed.")
@out_option("runs/eval", "Output folder; results.sqlite there is resumed when the settings match.")
def eval_command(
    source: ModelSource,
    defense: str,
    attack: str,
    attack_args: dict[str, object],
    norm: str,
    eps: float | None,
    budget_list: tuple[int, ...],
    images: int,
    passes: int,
    eot: int,
    bpda: bool,
    p_mis: bool,
    votes: int,
    lucky: bool,
    vote_rule: str,
    vote_alpha: float,
    vote_rate: float,
    confirm: int,
    batch_size: int,
    shard_size: int,
    target: str | None,
    api_key: str | None,
    seed: int,
    out: str,
) -> None:
    """Evaluate a (defended) model: clean accuracy (mean ± std over M passes) and robust accuracy."""
    from ..attacks import ThreatModel
    from ..defenses import parse_defense
    from ..evaluation.clean import clean_accuracy
    from ..evaluation.config import EvalConfig
    from ..evaluation.defaults import default_attack_args, default_eps
    from ..evaluation.protocol import evaluate
    from ..evaluation.store import ResultStore
    from ..reports.console import eval_table, snd_metrics

    attack = attack.lower()
    parsed_defense = parse_defense(defense)
    if target is not None:  # a sinai endpoint: the model is remote, its defense the server's
        from ..serving.remote import load_remote_and_images

        loaded = load_remote_and_images(target, api_key, source, images, seed, defense=parsed_defense)
        source, charged_before = replace(source, name=target), loaded.model.usage()["queries"]
    else:
        loaded = load_model_and_images(source, images, seed)
    eps = eps if eps is not None else default_eps(source.name, loaded.data, norm)
    config = EvalConfig(
        attack=attack,
        attack_args=default_attack_args(attack, loaded.data, norm) | attack_args,
        defense=parsed_defense,
        threat=ThreatModel(norm, eps),
        budgets=budget_list,
        seed=seed,
        passes=passes,
        eot=eot,
        votes=votes,
        lucky=lucky,
        vote_rule=vote_rule,
        vote_alpha=vote_alpha,
        vote_rate=vote_rate,
        confirm=confirm,
        shard_size=shard_size,
        track_mismatch=p_mis,
        bpda=bpda,
        describe={"model": source.name, "checkpoint": source.checkpoint, "dataset": loaded.data},
    )
    if target is not None:
        from ..serving.remote import check_remote_attack

        check_remote_attack(loaded.model, config.attacker)
    click.echo(
        f"{loaded.data}: {len(loaded.x)} images (seed {seed}); {attack} {norm} eps={eps:g}, budgets "
        f"{config.budgets}, M = {passes}, EOT {eot}, device {source.device}; results in {out}/results.sqlite",
        err=True,
    )
    with ResultStore(Path(out) / "results.sqlite") as store:
        result = evaluate(
            loaded.model, loaded.x, loaded.y, config, dataset_indices=loaded.indices.tolist(), store=store,
            batch_size=batch_size,
        )  # fmt: skip
    base = clean_accuracy(loaded.model, loaded.x, loaded.y, passes=1, batch_size=batch_size).mean
    click.echo(eval_table(source.name, result, base))
    metrics = snd_metrics(result)
    if metrics is not None:
        click.echo(metrics)
    click.echo(f"wall time {result.seconds:.1f} s", err=True)
    if target is not None:
        from ..serving.remote import remote_ledger

        charged = loaded.model.usage()["queries"] - charged_before
        click.echo(remote_ledger(result.results, loaded.model.sent, charged))
