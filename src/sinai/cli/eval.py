"""``sinai eval``: one robust-accuracy run of a (defended) model, resumable from its result store."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..attacks.threat import NORMS
from ..evaluation.defaults import PAPER, QUICK
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

if TYPE_CHECKING:
    from ..evaluation.protocol import EvalResult


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
@click.option(
    "--norm", type=click.Choice(NORMS), default="linf", show_default=True,
    help="Threat model: the norm of the eps-ball around each image.",
)  # fmt: skip
@click.option(
    "--eps",
    type=float,
    default=None,
    help="Threat-model radius in [0, 1] pixel units (default per dataset/model, see README).",
)
@click.option(
    "--budget",
    "budget_list",
    default=None,
    show_default=f"{QUICK.budgets}; --paper: {PAPER.budgets}",
    callback=parsed(budgets),
    help="Query budgets to report, comma-separated; one run with the largest.",
)
@click.option(
    "--images",
    type=int,
    default=None,
    show_default=f"{QUICK.images}; --paper: {PAPER.images}",
    help="N images, covering every class.",
)
@click.option(
    "--paper",
    is_flag=True,
    help=f"The papers' protocol (RFD section 4.1, SINAI section 5.1): {PAPER.images} images, budgets "
    f"{PAPER.budgets} (hours on a CPU; the defaults, {QUICK.images} images x {QUICK.budgets} queries, take "
    "minutes for the embedded models). Add --vote-rule fixed for the papers' majority vote.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object for the run on stdout (one line: settings, clean and robust accuracy "
    "in % with 95% intervals, queries) instead of the tables.",
)
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
    help="Uncounted passes that confirm a success on a randomized model (odd, >= 1): the fixed rule's "
    "majority, or the sequential vote's block size (--lucky: the query itself decides).",
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
    budget_list: tuple[int, ...] | None,
    images: int | None,
    paper: bool,
    as_json: bool,
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
    """Evaluate a (defended) model: clean accuracy (mean ± std over M passes) and robust accuracy.

    Defaults are sized to finish in minutes on a CPU; --paper runs the papers' protocol.
    """
    from ..attacks import ThreatModel
    from ..defenses import parse_defense
    from ..evaluation.clean import clean_accuracy
    from ..evaluation.config import EvalConfig
    from ..evaluation.defaults import default_attack_args, default_eps
    from ..evaluation.protocol import evaluate
    from ..evaluation.store import ResultStore
    from ..reports.console import eval_table, snd_metrics

    attack = attack.lower()
    quick = not paper and images is None and budget_list is None
    images, budget_list = protocol_size(paper, images, budget_list)
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
        f"{config.budgets}, M = {passes}, EOT {eot}, device {source.device}; results in {out}/results.sqlite"
        + (
            f" (quick defaults; --paper: the papers' {PAPER.images} images, budgets {PAPER.budgets})"
            if quick and config.attacker is not None
            else ""
        ),
        err=True,
    )
    with ResultStore(Path(out) / "results.sqlite") as store:
        result = evaluate(
            loaded.model, loaded.x, loaded.y, config, dataset_indices=loaded.indices.tolist(), store=store,
            batch_size=batch_size,
        )  # fmt: skip
    base = clean_accuracy(loaded.model, loaded.x, loaded.y, passes=1, batch_size=batch_size).mean
    if as_json:
        record = run_record(result, model=source.name, dataset=loaded.data, base=base)
        click.echo(json.dumps({**record, "store": str(Path(out) / "results.sqlite")}))
    else:
        click.echo(eval_table(source.name, result, base))
        metrics = snd_metrics(result)
        if metrics is not None:
            click.echo(metrics)
    click.echo(f"wall time {result.seconds:.1f} s", err=True)
    if target is not None:
        from ..serving.remote import remote_ledger

        charged = loaded.model.usage()["queries"] - charged_before
        click.echo(remote_ledger(result.results, loaded.model.sent, charged), err=as_json)


def protocol_size(
    paper: bool, images: int | None, budget_list: tuple[int, ...] | None
) -> tuple[int, tuple[int, ...]]:
    """The run's images and budgets: the ones given, else the defaults (``--paper``: the papers')."""
    if paper and (images is not None or budget_list is not None):
        given = " and ".join(o for o, v in (("--images", images), ("--budget", budget_list)) if v is not None)
        raise ValueError(
            f"--paper sets --images {PAPER.images} and --budget {PAPER.budgets}; drop {given} or --paper"
        )
    size = PAPER if paper else QUICK
    return (
        images if images is not None else size.images,
        budget_list if budget_list is not None else budgets(size.budgets),
    )


def _percent_interval(successes: int, n: int, key: str = "accuracy") -> dict[str, float | None]:
    """``{key: rate %, "low": %, "high": %, "n": n}``: the rate and its 95% Wilson interval (rate and
    bounds None without images)."""
    from ..reports.stats import wilson_interval

    if not n:
        return {key: None, "low": None, "high": None, "n": 0}
    low, high = wilson_interval(successes, n)
    return {key: _pct(successes / n), "low": _pct(low), "high": _pct(high), "n": n}


def _pct(fraction: float) -> float:
    """A fraction as a percentage rounded to 4 decimals (float32 accuracies carry noise beyond that)."""
    return round(100 * fraction, 4)


def run_record(result: EvalResult, *, model: str, dataset: str | None, base: float) -> dict[str, object]:
    """One run as a JSON-able object: its settings, clean accuracy (mean, std and per pass; 95% interval
    over the images), the undefended accuracy and the drop, robust accuracy at every budget (95% Wilson
    interval over the images; by confirmation too when the run has it), the queries of the broken
    images, and for decision attacks SND's metrics (attack success rate, mean norm; P_mis when measured).
    Accuracies are in %; intervals as ``sinai eval``'s table (:mod:`sinai.reports.stats`)."""
    from ..reports.confirm import has_confirmation, robust_confirmed_at
    from ..reports.stats import clean_interval
    from ..reports.worst import attack_kind

    config, results = result.config, result.results
    n = int(result.settings.get("images") or len(results))
    low, high = clean_interval(min(1.0, max(0.0, result.clean_mean)), n) if n else (None, None)
    clean = {
        "mean": _pct(result.clean_mean),
        "low": None if low is None else _pct(low),
        "high": None if high is None else _pct(high),
        "n": n,
        "std": _pct(result.clean_std),
        "passes": [_pct(c) for c in result.clean],
    }
    record: dict[str, object] = {
        "model": model,
        "dataset": dataset,
        "defense": config.defense.describe() if config.defense.specs else "none",
        "defense_spec": config.defense.to_dict(),
        "attack": config.attack,
        "attack_kind": attack_kind(config.attack) if config.attacker is not None else None,
        "attack_args": dict(config.attack_args),
        "norm": config.threat.norm,
        "eps": config.threat.eps,
        "budgets": list(config.budgets),
        "images": n,
        "seed": config.seed,
        "eot": config.eot,
        "votes": config.votes,
        "vote_rule": config.vote_rule,
        "lucky": config.lucky,
        "clean_accuracy": clean,
        "base_clean_accuracy": _pct(base),
        "drop": _pct(base - result.clean_mean),
    }
    if config.attacker is not None:
        confirmed = has_confirmation(results)
        robust = []
        for b in config.budgets:
            row = {"budget": b, **_percent_interval(sum(r.robust_at(b) for r in results), len(results))}
            if confirmed:
                row["confirmed"] = _percent_interval(
                    sum(robust_confirmed_at(r, b) for r in results), len(results)
                )
            robust.append(row)
        broken = [r.success_at for r in results if r.success_at is not None]
        record["robust_accuracy"] = robust
        record["queries"] = {
            "total": sum(r.queries for r in results),
            "mean": statistics.fmean(r.queries for r in results) if results else None,
            "median_broken": statistics.median(broken) if broken else None,
            "broken": len(broken),
        }
        if record["attack_kind"] == "decision":
            attacked = [r for r in results if r.clean_correct]
            record["snd"] = {
                "attack_success": [
                    {
                        "budget": b,
                        **_percent_interval(sum(not r.robust_at(b) for r in attacked), len(attacked), "rate"),
                        "mean_norm": result.mean_norm(b),
                    }
                    for b in config.budgets
                ],
                "p_mis": result.p_mis,
            }
        elif result.p_mis is not None:
            record["snd"] = {"p_mis": result.p_mis}
    record["seconds"] = result.seconds
    return record
