"""``sinai calibrate``: the std of each one-kind defense that costs a given clean-accuracy drop."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import click
from tqdm.auto import tqdm

from .options import (
    ModelSource,
    fractions,
    load_model_and_images,
    model_options,
    names,
    out_option,
    parsed,
    passes_option,
    seed_option,
)


def _defenses(text: str) -> tuple[str, ...]:
    """'RND,FND' -> ('RND', 'FND'), each parsed once here so that a typo fails before the model loads."""
    from ..defenses import parse_defense

    found = names(text)
    if not found:
        raise ValueError(f"expected comma-separated defenses such as RND,FND, got {text!r}")
    for name in found:
        parse_defense(name)
    return found


@click.command()
@model_options(default="mnist-vit")
@click.option(
    "--defense", "defenses", default="RND,FND,SINAI-Attn", show_default=True, callback=parsed(_defenses),
    help="Comma-separated one-kind defenses (kinds the model lacks are skipped).",
)  # fmt: skip
@click.option(
    "--drop", default="0.01,0.02", show_default=True, callback=parsed(fractions),
    help="Target clean-accuracy drops (fractions).",
)  # fmt: skip
@click.option(
    "--tolerance", type=float, default=0.0025, show_default=True, help="Accepted |drop - target| (fraction)."
)
@click.option("--low", type=float, default=0.0, show_default=True, help="Lowest std searched.")
@click.option("--high", type=float, default=None, help="Highest std searched (default per site kind).")
@click.option("--images", type=int, default=500, show_default=True, help="Validation images (seeded).")
@passes_option
@seed_option("Seed of the image selection and the noise.")
@out_option("runs/calibrate", "Output folder of the calibration table.")
@click.option(
    "--progress/--no-progress", default=True, show_default=True,
    help="Show progress on stderr: calibrations done, and each bisection step's std and drop.",
)  # fmt: skip
def calibrate(
    source: ModelSource, defenses: tuple[str, ...] | None, drop: tuple[float, ...], tolerance: float,
    low: float, high: float | None, images: int, passes: int, seed: int, out: str, progress: bool,
) -> None:  # fmt: skip
    """Find the std of each defense that costs a given clean-accuracy drop (bisection, fixed seeds)."""
    from ..defenses import PRESETS, parse_defense
    from ..reports.console import calibration_table
    from ..tuning.calibrate import calibrate as calibrate_std

    loaded = load_model_and_images(source, images, seed)
    model, x, y = loaded.model, loaded.x.to(source.device), loaded.y.to(source.device)
    done, saved, jobs = [], [], []
    for name in defenses or ():
        defense = parse_defense(name)
        if defense.name in PRESETS and not defense.given and not _has_sites(defense, model):
            click.echo(f"{name}: {source.name} has none of its sites, skipped", err=True)
            continue  # (a kind the user set, e.g. SINAI-Attn:std=1 on a CNN, is an error in calibrate_std)
        jobs += [(name, defense, target) for target in drop]
    if not jobs:
        raise ValueError(
            f"{source.name} has the sites of none of the defenses {', '.join(defenses or ())}; pick one-kind "
            f"defenses it has (sinai sites --model {source.name})"
        )
    bar = tqdm(total=len(jobs), unit="calibration", desc="calibrate", disable=not progress)
    for name, defense, target in jobs:
        bar.set_description(f"calibrate {name} to {100 * target:g}% drop")
        c = calibrate_std(
            model, x, y, defense, drop=target, tolerance=tolerance, low=low, high=high, passes=passes,
            seed=seed, on_step=_step_reporter(bar),
        )  # fmt: skip
        bar.update(1)
        done.append((name, c))
        saved.append(
            {"model": source.name, "dataset": loaded.data, "images": len(x), "seed": seed, **c.as_dict()}
        )
    bar.close()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "calibration.json").write_text(json.dumps(saved, indent=2) + "\n")
    click.echo(
        f"{source.name} on {len(x)} {loaded.data} images (seed {seed}), M = {passes}, tolerance "
        f"{100 * tolerance:g} points; base accuracy {100 * saved[0]['base']:.2f}%"
        if saved
        else "nothing to do"
    )
    click.echo(calibration_table(done))
    if any(not c.reached for _, c in done):
        click.echo("some targets were not reached in the std range: widen it with --high / --low", err=True)
    click.echo(f"written: {folder / 'calibration.json'}", err=True)


def _step_reporter(bar: tqdm) -> Callable[[float, float], None]:
    """``calibrate``'s ``on_step``: the bar's postfix says the step, the std tried and its drop."""
    steps = itertools.count(1)
    return lambda std, d: bar.set_postfix_str(f"step {next(steps)}: std {std:.4g} -> drop {100 * d:.2f}%")


def _has_sites(defense: object, model: object) -> bool:
    """Whether ``model`` has sites of any kind ``defense`` puts noise at."""
    try:
        return bool(defense.for_model(model).specs)
    except ValueError:  # for_model's "the model has none of its sites"
        return False
