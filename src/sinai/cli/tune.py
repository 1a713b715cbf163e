"""``sinai tune``: Optuna NSGA-II over SINAI's stds and ratios under a clean-accuracy-drop bound."""

from __future__ import annotations

from pathlib import Path

import click

from ..attacks.threat import NORMS
from .options import (
    ModelSource,
    fidelity,
    fractions,
    load_model_and_images,
    model_options,
    out_option,
    parsed,
    passes_option,
    seed_option,
)

TUNED = {"SINAI": ("attn", "gelu", "relu"), "SINAI-Attn": ("attn",), "SINAI-FFN": ("gelu",)}


@click.command()
@model_options(default="mnist-vit")
@click.option(
    "--defense", default="SINAI", show_default=True, type=click.Choice(list(TUNED)),
    help="Which SINAI kinds to tune (those the model has).",
)  # fmt: skip
@click.option(
    "--delta", default="0.01", show_default=True, callback=parsed(fractions),
    help="Clean-accuracy drop bound(s), e.g. 0.01,0.02.",
)  # fmt: skip
@click.option("--trials", type=click.IntRange(min=1), default=40, show_default=True, help="NSGA-II trials.")
@click.option(
    "--population", type=click.IntRange(min=2), default=10, show_default=True, help="NSGA-II population."
)
@click.option(
    "--range",
    "ranges",
    default="",
    help="Override search ranges: attn.std=0:1,gelu.ratio=0:1 (default per model).",
)
@click.option(
    "--images", type=int, default=500, show_default=True, help="Validation images (clean accuracy)."
)
@click.option(
    "--screen", default="50:200", show_default=True, callback=parsed(fidelity),
    help="IMAGES:BUDGET of the cheap Square run.",
)  # fmt: skip
@click.option(
    "--full", default="100:1000", show_default=True, callback=parsed(fidelity),
    help="IMAGES:BUDGET for promoted trials.",
)  # fmt: skip
@passes_option
@click.option(
    "--norm", type=click.Choice(NORMS), default="linf", show_default=True,
    help="Threat model of the Square runs: the norm of the eps-ball.",
)  # fmt: skip
@click.option(
    "--eps", type=float, default=None,
    help="Radius of the Square runs' threat model in [0, 1] pixel units (the size of the allowed "
    "perturbation, not a query budget; default per dataset/model, as sinai eval).",
)  # fmt: skip
@click.option(
    "--storage", default=None,
    help="Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or journal:FILE (Optuna's journal "
    "file, for NFS); default sqlite:///OUT/study.sqlite.",
)  # fmt: skip
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Trial workers on the one study (processes, one torch thread each); > 1 needs --storage "
    "postgresql://... or journal:FILE.",
)  # fmt: skip
@click.option("--study-name", default=None, help="Default: MODEL-DEFENSE.")
@seed_option("Seed of the image selection, noise, Square and the NSGA-II sampler.")
@out_option("runs/tune", "Output folder: study.sqlite (resumed), results.sqlite, tables and plots.")
def tune(
    source: ModelSource, defense: str, delta: tuple[float, ...], trials: int, population: int, ranges: str,
    images: int, screen: object, full: object, passes: int, norm: str, eps: float | None,
    storage: str | None, workers: int, study_name: str | None, seed: int, out: str,
) -> None:  # fmt: skip
    """Optuna NSGA-II over SINAI's stds and ratios: max clean and robust accuracy, clean >= base - delta."""
    from ..attacks import ThreatModel
    from ..evaluation.defaults import default_attack_args, default_eps
    from ..evaluation.store import ResultStore
    from ..reports.console import tuning_table
    from ..reports.report import write_tuning
    from ..tuning.tune import no_feasible_text, parse_ranges, search_space
    from ..tuning.tune import tune as run_tune

    loaded = load_model_and_images(source, images, seed)
    model, x, y = loaded.model, loaded.x.to(source.device), loaded.y.to(source.device)
    space = search_space(model, source.name, parse_ranges(ranges))
    space = {k: v for k, v in space.items() if k.partition(".")[0] in TUNED[defense]}
    eps = eps if eps is not None else default_eps(source.name, loaded.data, norm)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(folder / 'study.sqlite').resolve()}"
    say = lambda msg: click.echo(msg, err=True)
    say(
        f"{source.name}: tuning {', '.join(f'{k} in [{lo:g}, {hi:g}]' for k, (lo, hi) in space.items())} "
        f"on {len(x)} {loaded.data} images; Square {norm} eps {eps:g}; study in {storage}"
    )
    with ResultStore(folder / "results.sqlite") as store:
        result = run_tune(
            model, x, y, deltas=delta, space=space, model_name=source.name, trials=trials,
            population=population, passes=passes, screen=screen, full=full, threat=ThreatModel(norm, eps),
            attack_kwargs=default_attack_args("square", loaded.data, norm), storage=storage,
            study_name=study_name or f"{source.name}-{defense}", store=store, seed=seed, log=say,
            workers=workers,
        )  # fmt: skip
    files = write_tuning(result, folder, source.name, method=defense)
    click.echo(f"base clean accuracy {100 * result.base:.2f}%; Pareto front (feasible, screened):")
    click.echo(tuning_table(result))
    for d, t in result.chosen.items():
        if t is None:
            click.echo(
                f"delta {100 * d:g}%: {no_feasible_text(d)} in {len(result.trials)} trials; widen --range "
                "(smaller stds) or add --trials"
            )
        else:
            click.echo(
                f"delta {100 * d:g}%: {t.defense().describe()}  clean {100 * t.clean:.2f}% "
                f"(drop {100 * t.drop:.2f}), robust {100 * t.robust_full:.1f}% at {full.budget} queries"
            )
    say(f"written: {', '.join(str(f) for f in files)}")
