"""``sinai analyze <what>``: the analyses behind the papers' figures, each writing CSV + PNG to ``--out``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch
from tqdm.auto import tqdm

from ..attacks.threat import NORMS
from .options import (
    ModelSource,
    load_model_and_images,
    model_options,
    names,
    numbers,
    out_option,
    parsed,
    seed_option,
)

if TYPE_CHECKING:
    from ..analysis.common import RobustCheck

EMBEDDED_DEFAULT = ("mnist-cnn", "mnist-vit")


@dataclass(frozen=True)
class AnalysisRun:
    """The options every analysis shares: models and data, sizes, threat model, output folder."""

    sources: list[ModelSource]
    images: int
    robust_images: int
    budget: int
    norm: str
    eps: float | None
    passes: int
    seed: int
    out: Path


@dataclass(frozen=True)
class _Setup:
    """One model with its images: ``x, y`` for clean measures, ``robust`` the attack on its own images
    (``None``: no attacks)."""

    name: str
    model: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    robust: RobustCheck | None


def _options(what: str, images: int) -> Callable:
    """The shared options; the command gets them as ``run`` (an :class:`AnalysisRun`)."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(
            *args: object, sources: list[ModelSource], images: int, robust_images: int, budget: int,
            norm: str, eps: float | None, passes: int, seed: int, out: str, **kwargs: object,
        ) -> object:  # fmt: skip
            run = AnalysisRun(sources, images, robust_images, budget, norm, eps, passes, seed, Path(out))
            return fn(*args, run=run, **kwargs)

        options = [
            click.option(
                "--images",
                type=click.IntRange(min=1),
                default=images,
                show_default=True,
                help="Images for clean-data measures.",
            ),  # fmt: skip
            click.option(
                "--robust-images",
                type=click.IntRange(min=0),
                default=50,
                show_default=True,
                help="Images attacked with Square for robust accuracy (0: skip the attacks).",
            ),  # fmt: skip
            click.option(
                "--budget",
                type=click.IntRange(min=1),
                default=100,
                show_default=True,
                help="Square query budget.",
            ),  # fmt: skip
            click.option(
                "--norm",
                type=click.Choice(NORMS),
                default="linf",
                show_default=True,
                help="Threat model of the Square runs: the norm of the eps-ball.",
            ),
            click.option(
                "--eps", type=float, default=None, help="Attack radius (default per dataset; MNIST linf 0.1)."
            ),
            click.option(
                "--passes",
                type=click.IntRange(min=1),
                default=3,
                show_default=True,
                help="Noisy passes per clean accuracy.",
            ),  # fmt: skip
            seed_option("Image selection and noise seed."),
            out_option(f"runs/analyze/{what}", "Output folder for the CSV and PNG files."),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return model_options(EMBEDDED_DEFAULT)(wrapper)

    return decorate


def _setups(run: AnalysisRun) -> Iterator[_Setup]:
    from ..analysis.common import RobustCheck
    from ..attacks import ThreatModel
    from ..evaluation.defaults import default_eps
    from ..models.data import sample

    for source in run.sources:
        loaded = load_model_and_images(source, run.images, run.seed)
        robust = None
        if run.robust_images:
            eps = run.eps if run.eps is not None else default_eps(source.name, loaded.data, run.norm)
            x, y = sample(loaded.dataset, run.robust_images, run.seed)
            robust = RobustCheck(x, y, ThreatModel(run.norm, eps), run.budget)
        yield _Setup(source.name, loaded.model, loaded.x, loaded.y, robust)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step")


def _print_files(files: list[Path]) -> None:
    click.echo("wrote " + ", ".join(str(f) for f in files), err=True)


@click.group()
def analyze() -> None:
    """Analyses behind the papers' figures (SINAI Fig. 1-4, RFD Fig. 1, Tables 6/14): CSV + PNG files."""


@analyze.command()
@_options("sensitivity", images=500)
@click.option(
    "--stds",
    default="0,0.05,0.1,0.2,0.4,0.8,1.6",
    show_default=True,
    callback=parsed(numbers),
    help="Noise stds to sweep (comma-separated).",
)
@click.option(
    "--kinds",
    default=None,
    callback=parsed(names),
    help="Site kinds (default: every one the model has of attn,gelu,relu,input,feature).",
)
@click.option(
    "--layer", default=None, help="Module whose output the MSE is measured at (default: a middle layer)."
)
def sensitivity(
    run: AnalysisRun, stds: tuple[float, ...], kinds: tuple[str, ...] | None, layer: str | None
) -> None:
    """Clean accuracy, mid-layer MSE and Square robust accuracy vs noise std, one site kind at a time."""
    from ..analysis import plots
    from ..analysis.common import check_stds, write_csv
    from ..analysis.sensitivity import sensitivity_summary, site_kinds, sweep_sensitivity
    from ..reports.console import summary_table

    std_values = check_stds(stds)
    rows = []
    for setup in _setups(run):
        chosen = site_kinds(setup.model, list(kinds) if kinds else None)
        with _bar(len(chosen) * len(std_values), f"sensitivity {setup.name}") as bar:
            rows += sweep_sensitivity(
                setup.model, setup.x, setup.y, kinds=chosen, stds=std_values, passes=run.passes,
                seed=run.seed, layer=layer, robust=setup.robust, name=setup.name, on_step=bar.update,
            )  # fmt: skip
    summary = sensitivity_summary(rows)
    out = run.out
    files = [write_csv(out / "sensitivity.csv", rows), write_csv(out / "sensitivity_summary.csv", summary)]
    files += [plots.sensitivity_clean(rows, out / "sensitivity_clean.png")]
    files += [plots.sensitivity_mse(rows, out / "sensitivity_mse.png")]
    if any(r.robust is not None for r in rows):
        files += [plots.sensitivity_robust(rows, out / "sensitivity_robust.png", run.budget)]
    click.echo(summary_table(summary))
    _print_files(files)


@analyze.command()
@_options("gradnorm", images=300)
@click.option(
    "--kinds", default=None, callback=parsed(names), help="gelu and/or relu (default: those the model has)."
)
@click.option(
    "--std",
    default="auto",
    show_default=True,
    callback=parsed(lambda text: None if text == "auto" else numbers(text)),
    help="Noise std for the ratio sweep; 'auto': the std at which uniform noise costs --drop clean accuracy.",
)
@click.option(
    "--drop", type=float, default=0.05, show_default=True, help="Clean drop of uniform noise for --std auto."
)
@click.option(
    "--ratios", default="0,0.25,0.5,0.75,1", show_default=True, callback=parsed(numbers),
    help="Injection ratios to sweep.",
)  # fmt: skip
@click.option(
    "--stat-images", type=int, default=100, show_default=True, help="Images for the gradient-norm statistics."
)
@click.option(
    "--agreement-ratio",
    type=float,
    default=0.5,
    show_default=True,
    help="Ratio at which the proxy's precision is read.",
)
@click.option(
    "--loss", type=click.Choice(["margin", "ce"]), default="margin", show_default=True,
    help="Loss whose gradient norms are measured: margin (true logit - best other) or cross-entropy.",
)  # fmt: skip
def gradnorm(
    run: AnalysisRun,
    kinds: tuple[str, ...] | None,
    std: tuple[float, ...] | None,
    drop: float,
    ratios: tuple[float, ...],
    stat_images: int,
    agreement_ratio: float,
    loss: str,
) -> None:
    """Per-logit gradient norms before GeLU/ReLU, critical- vs non-critical-first noise, proxy agreement."""
    from ..analysis import plots
    from ..analysis.common import check_ratios, check_stds, write_csv
    from ..analysis.gradnorm import (
        RULES,
        gradient_norms,
        histogram,
        rank_agreement,
        ratio_sweep,
        selective_sites,
        uniform_std,
    )
    from ..defenses import find_sites
    from ..reports.console import gradnorm_table

    ratio_values = check_ratios(ratios)
    check_ratios([agreement_ratio])
    fixed_std = None if std is None else check_stds(std)[0]
    stats, hist_rows, pooled, sweep, agreement = [], [], {}, [], []
    for setup in _setups(run):
        found = find_sites(setup.model, ["gelu", "relu"])
        chosen = list(kinds) if kinds else [k for k in ("gelu", "relu") if found[k]]
        for kind in chosen:
            selective_sites(setup.model, kind)
        xs, ys = setup.x[:stat_images], setup.y[:stat_images]
        s, p = gradient_norms(setup.model, xs, ys, kinds=chosen, loss=loss, name=setup.name)
        stats += s
        for kind, values in p.items():
            pooled[(setup.name, kind)] = values
            hist_rows += histogram(values, model=setup.name, kind=kind)
        agreement += rank_agreement(
            setup.model, xs, ys, kinds=chosen, ratio=agreement_ratio, loss=loss, name=setup.name
        )
        for kind in chosen:
            kind_std = (
                fixed_std
                if fixed_std is not None
                else uniform_std(setup.model, setup.x, setup.y, kind, drop=drop)
            )
            steps = len(ratio_values) * len(RULES)
            with _bar(steps, f"gradnorm {setup.name} {kind}") as bar:
                sweep += ratio_sweep(
                    setup.model, setup.x, setup.y, kind, std=kind_std, ratios=ratio_values, passes=run.passes,
                    seed=run.seed, loss=loss, robust=setup.robust, name=setup.name, on_step=bar.update,
                )  # fmt: skip
                bar.update(steps - bar.n)
    out = run.out
    files = [
        write_csv(out / "gradnorm_stats.csv", stats),
        write_csv(out / "gradnorm_hist.csv", hist_rows),
        write_csv(out / "gradnorm_ratio.csv", sweep),
        write_csv(out / "gradnorm_agreement.csv", agreement),
        plots.gradnorm_hist(pooled, out / "gradnorm_hist.png"),
        plots.ratio_sweep(sweep, out / "gradnorm_ratio.png", run.budget),
        plots.rank_agreement(agreement, out / "gradnorm_agreement.png"),
    ]
    click.echo(gradnorm_table(stats))
    _print_files(files)


@analyze.command()
@_options("theory", images=200)
@click.option(
    "--layers",
    default=None,
    callback=parsed(names),
    help="Layers: input, penultimate or module names (default: input + blocks/stages/activations).",
)
@click.option(
    "--std", type=float, default=0.1, show_default=True, help="Fixed noise std per layer (RFD Table 6)."
)
@click.option(
    "--drop",
    type=float,
    default=0.04,
    show_default=True,
    help="Clean drop the calibrated std costs (Table 14).",
)
@click.option(
    "--step",
    type=float,
    default=0.05,
    show_default=True,
    help="linf size of the one adversarial gradient step.",
)
@click.option(
    "--flip-std", type=float, default=0.02, show_default=True, help="Defense noise std for the flip test."
)
@click.option(
    "--probe-std",
    default="0.01",
    show_default=True,
    callback=parsed(numbers),
    help="Std of the attacker's directions u (comma-separated).",
)
@click.option("--flip-images", type=int, default=50, show_default=True, help="Images for the flip test.")
@click.option("--directions", type=int, default=64, show_default=True, help="Random directions per image.")
def theory(
    run: AnalysisRun,
    layers: tuple[str, ...] | None,
    std: float,
    drop: float,
    step: float,
    flip_std: float,
    probe_std: tuple[float, ...],
    flip_images: int,
    directions: int,
) -> None:
    """RFD Theorem 1: gradient-norm ratios per layer, predicted vs measured flip rate, per-layer sweep."""
    from ..analysis import plots
    from ..analysis.common import check_stds, write_csv
    from ..analysis.probes import default_layers
    from ..analysis.theory import flip_rates, gradient_ratios, layer_sweep
    from ..reports.console import theory_table

    probes = check_stds(probe_std)
    check_stds([std, flip_std])
    ratio_rows, flip_rows, sweep_rows = [], [], []
    for setup in _setups(run):
        chosen = list(layers) if layers else ["input", *default_layers(setup.model)]
        ratios = gradient_ratios(setup.model, setup.x, setup.y, chosen, step=step, name=setup.name)
        ratio_rows += ratios
        with _bar(len(chosen) * (len(probes) + 1), f"theory {setup.name}") as bar:
            for p in probes:
                for layer in chosen:
                    flip_rows += flip_rates(
                        setup.model, setup.x[:flip_images], setup.y[:flip_images], layer, std=flip_std,
                        probe_std=p, directions=directions, seed=run.seed, name=setup.name,
                    )  # fmt: skip
                    bar.update()
            sweep_rows += layer_sweep(
                setup.model, setup.x, setup.y, chosen, std=std, drop=drop, passes=run.passes, seed=run.seed,
                ratios=ratios, robust=setup.robust, name=setup.name, on_step=bar.update,
            )  # fmt: skip
    out = run.out
    files = [
        write_csv(out / "theory_ratios.csv", ratio_rows),
        write_csv(out / "theory_flips.csv", flip_rows),
        write_csv(out / "theory_layers.csv", sweep_rows),
        plots.theory_ratios(ratio_rows, out / "theory_ratios.png"),
        plots.theory_flips(flip_rows, out / "theory_flips.png"),
        plots.theory_layers(sweep_rows, out / "theory_layers.png", run.budget),
    ]
    click.echo(theory_table(sweep_rows, flip_rows, std))
    _print_files(files)
