"""The ``sinai`` command line: every command is a short path through protect -> evaluate -> report."""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

from . import __version__


class _Group(click.Group):
    """Turns the library's clear ``ValueError``/``FileNotFoundError`` messages into CLI errors."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise  # click's own control flow (Exit, raised by --help, is a RuntimeError)
        except (ValueError, FileNotFoundError, RuntimeError, TypeError) as err:
            raise click.ClickException(str(err)) from err


def _common(fn: Callable) -> Callable:
    """--device and --cache-dir, shared by every command that loads a model."""

    @click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
    @click.option(
        "--cache-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Where trained embedded models are cached (default: $SINAI_CACHE_DIR or the user cache).",
    )
    @functools.wraps(fn)
    def wrapper(*args: object, device: str, cache_dir: str | None, **kwargs: object) -> object:
        from .device import resolve_device

        return fn(*args, device=resolve_device(device), cache_dir=cache_dir, **kwargs)

    return wrapper


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sinai")
def cli() -> None:
    """Protect image classifiers against query-based black-box attacks with inference-time noise."""


@cli.command()
@click.option("--quick", is_flag=True, help="Small sizes: a smoke test of every stage (about 3 minutes).")
@click.option(
    "--images", type=int, default=None, help="Evaluation images per model (default 50, both sizes)."
)
@click.option("--budget", type=int, default=None, help="Queries per image (default 1000; --quick 200).")
@click.option("--trials", type=int, default=None, help="NSGA-II trials per model (default 12; --quick 4).")
@click.option(
    "--attacks",
    default=None,
    help="Comma-separated attacks of the table (default square,signhunter,nes,rays,signflip).",
)
@click.option(
    "--models",
    default=None,
    help="Comma-separated embedded models (default mnist-cnn,mnist-vit). Two demos with different "
    "--models may share one --out and run side by side.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@_common
def demo(
    quick: bool,
    images: int | None,
    budget: int | None,
    trials: int | None,
    attacks: str | None,
    models: str | None,
    seed: int,
    out: str,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """The main job on the embedded MNIST default: calibrate, tune, attack, report (resumable)."""
    from .demo import run_demo

    run_demo(
        out=Path(out),
        quick=quick,
        eval_images=images,
        budget=budget,
        trials=trials,
        attacks=[a.strip() for a in attacks.split(",") if a.strip()] if attacks else None,
        models=[m.strip() for m in models.split(",") if m.strip()] if models else None,
        seed=seed,
        device=device,
        cache_dir=cache_dir,
    )


def _model_options(fn: Callable) -> Callable:
    """--model/--checkpoint/--weights/--num-classes/--data/--data-root, shared by calibrate and tune."""
    for option in reversed(
        [
            click.option("--model", "model_name", default="mnist-vit", show_default=True),
            click.option("--checkpoint", type=click.Path(dir_okay=False), default=None),
            click.option("--weights", type=click.Choice(["pretrained", "random"]), default="pretrained"),
            click.option(
                "--num-classes", type=int, default=None, help="Head size of timm/torchvision models."
            ),
            click.option(
                "--data", default=None, help="mnist, cifar10 or imagenet (default: the model's own)."
            ),
            click.option("--data-root", type=click.Path(), default=None, help="Root of cifar10 / imagenet."),
        ]
    ):
        fn = option(fn)
    return fn


def _load_model_and_images(
    model_name, checkpoint, weights, num_classes, data, data_root, images, seed, device, cache_dir
):
    """The model and ``images`` seeded class-covering images of its dataset (the validation set)."""
    from .models.data import load_dataset, select_images
    from .models.zoo import default_dataset, load_model

    model = load_model(
        model_name, checkpoint=checkpoint, weights=weights, num_classes=num_classes, device=device,
        cache_dir=cache_dir,
    )  # fmt: skip
    data = data or default_dataset(model_name, num_classes=model.num_classes)
    dataset = load_dataset(data, root=data_root, image_size=model.input_shape[-1])
    _check_fits(dataset, model)
    chosen = select_images(dataset.labels, images, seed, dataset.num_classes)
    return model, data, dataset.load(chosen).to(device), dataset.labels[chosen].to(device)


def _fractions(text: str, hint: str) -> tuple[float, ...]:
    try:
        values = tuple(sorted({float(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise click.BadParameter(
            f"expected fractions like 0.01,0.02, got {text!r}", param_hint=hint
        ) from None
    if not values or not all(0 < v < 1 for v in values):
        raise click.BadParameter(
            f"must be fractions in (0, 1) (0.01 = 1 percentage point), got {text!r}", param_hint=hint
        )
    return values


@cli.command()
@_model_options
@click.option(
    "--defense", "defenses", default="RND,FND,SINAI-Attn", show_default=True,
    help="Comma-separated one-kind defenses (kinds the model lacks are skipped).",
)  # fmt: skip
@click.option(
    "--drop", default="0.01,0.02", show_default=True, help="Target clean-accuracy drops (fractions)."
)
@click.option(
    "--tolerance", type=float, default=0.0025, show_default=True, help="Accepted |drop - target| (fraction)."
)
@click.option("--low", type=float, default=0.0, show_default=True, help="Lowest std searched.")
@click.option("--high", type=float, default=None, help="Highest std searched (default per site kind).")
@click.option("--images", type=int, default=500, show_default=True, help="Validation images (seeded).")
@click.option("--passes", type=int, default=3, show_default=True, help="Noisy passes per clean accuracy (M).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="runs/calibrate", show_default=True)
@_common
def calibrate(
    model_name, checkpoint, weights, num_classes, data, data_root, defenses, drop, tolerance, low, high,
    images, passes, seed, out, device, cache_dir,
) -> None:  # fmt: skip
    """Find the std of each defense that costs a given clean-accuracy drop (bisection, fixed seeds)."""
    from .defenses import PRESETS, applicable, parse_defense
    from .reports.table import markdown_table
    from .tuning.calibrate import calibrate as calibrate_std

    drops = _fractions(drop, "--drop")
    model, data, x, y = _load_model_and_images(
        model_name, checkpoint, weights, num_classes, data, data_root, images, seed, device, cache_dir
    )
    rows, saved = [], []
    for name in (d.strip() for d in defenses.split(",") if d.strip()):
        parsed = parse_defense(name)
        if parsed.name in PRESETS and not applicable(parsed, model).specs:
            click.echo(f"{name}: {model_name} has none of its sites, skipped", err=True)
            continue
        for target in drops:
            c = calibrate_std(
                model, x, y, parsed, drop=target, tolerance=tolerance, low=low, high=high, passes=passes,
                seed=seed,
            )  # fmt: skip
            saved.append(
                {"model": model_name, "dataset": data, "images": len(x), "seed": seed, **c.as_dict()}
            )
            spec = c.defense.specs[c.kind]
            text = (
                f"{c.defense.name}:std={c.std:.4g}"
                if c.defense.name in PRESETS
                else f"{c.kind}.std={c.std:.4g}"
            )
            if spec.ratio != 1:
                text += f",ratio={spec.ratio:g}"
            rows.append(
                [name, f"{100 * target:g}", round(c.std, 4), round(100 * c.drop, 2),
                 "yes" if c.reached else "NO", len(c.steps), text]
            )  # fmt: skip
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "calibration.json").write_text(json.dumps(saved, indent=2) + "\n")
    click.echo(
        f"{model_name} on {len(x)} {data} images (seed {seed}), M = {passes}, tolerance "
        f"{100 * tolerance:g} points; base accuracy {100 * saved[0]['base']:.2f}%"
        if saved
        else "nothing to do"
    )
    click.echo(
        markdown_table(["defense", "target %", "std", "drop %", "reached", "steps", "use as --defense"], rows)
    )
    if any(r[4] == "NO" for r in rows):
        click.echo("some targets were not reached in the std range: widen it with --high / --low", err=True)
    click.echo(f"written: {Path(out) / 'calibration.json'}", err=True)


def _fidelity(text: str, hint: str):
    from .tuning.tune import Fidelity

    images, colon, budget = text.partition(":")
    try:
        return Fidelity(int(images), int(budget))
    except ValueError:
        raise click.BadParameter(
            f"expected IMAGES:BUDGET such as 50:200, got {text!r}", param_hint=hint
        ) from None


@cli.command()
@_model_options
@click.option(
    "--defense", default="SINAI", show_default=True, type=click.Choice(["SINAI", "SINAI-Attn", "SINAI-FFN"]),
    help="Which SINAI kinds to tune (those the model has).",
)  # fmt: skip
@click.option(
    "--delta", default="0.01", show_default=True, help="Clean-accuracy drop bound(s), e.g. 0.01,0.02."
)
@click.option("--trials", type=click.IntRange(min=1), default=40, show_default=True)
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
@click.option("--screen", default="50:200", show_default=True, help="IMAGES:BUDGET of the cheap Square run.")
@click.option("--full", default="100:1000", show_default=True, help="IMAGES:BUDGET for promoted trials.")
@click.option("--passes", type=int, default=3, show_default=True, help="Noisy passes per clean accuracy (M).")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--eps", type=float, default=None, help="Attack budget (default per dataset/model).")
@click.option("--storage", default=None, help="Optuna RDB URL (default sqlite:///OUT/study.sqlite).")
@click.option("--study-name", default=None, help="Default: MODEL-DEFENSE.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="runs/tune", show_default=True)
@_common
def tune(
    model_name, checkpoint, weights, num_classes, data, data_root, defense, delta, trials, population, ranges,
    images, screen, full, passes, norm, eps, storage, study_name, seed, out, device, cache_dir,
) -> None:  # fmt: skip
    """Optuna NSGA-II over SINAI's stds and ratios: max clean and robust accuracy, clean >= base - delta."""
    from .evaluation.defaults import default_attack_args, default_eps
    from .evaluation.store import ResultStore
    from .reports.report import write_tuning
    from .reports.table import markdown_table
    from .tuning.tune import parse_ranges, search_space
    from .tuning.tune import tune as run_tune

    deltas = _fractions(delta, "--delta")
    screen_f, full_f = _fidelity(screen, "--screen"), _fidelity(full, "--full")
    model, data, x, y = _load_model_and_images(
        model_name, checkpoint, weights, num_classes, data, data_root, images, seed, device, cache_dir
    )
    space = search_space(model, model_name, parse_ranges(ranges))
    keep = {"SINAI": ("attn", "gelu", "relu"), "SINAI-Attn": ("attn",), "SINAI-FFN": ("gelu",)}[defense]
    space = {k: v for k, v in space.items() if k.partition(".")[0] in keep}
    eps = eps if eps is not None else default_eps(model_name, data, norm)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(folder / 'study.sqlite').resolve()}"
    click.echo(
        f"{model_name}: tuning {', '.join(f'{k} in [{lo:g}, {hi:g}]' for k, (lo, hi) in space.items())} "
        f"on {len(x)} {data} images; Square {norm} eps {eps:g}; study in {storage}",
        err=True,
    )
    with ResultStore(folder / "results.sqlite") as store:
        result = run_tune(
            model, x, y, deltas=deltas, space=space, model_name=model_name, trials=trials,
            population=population, passes=passes, screen=screen_f, full=full_f, norm=norm, eps=eps,
            attack_kwargs=default_attack_args("square", data, norm), storage=storage,
            study_name=study_name or f"{model_name}-{defense}", store=store, seed=seed,
            log=lambda msg: click.echo(msg, err=True),
        )  # fmt: skip
    files = write_tuning(result, folder, model_name)
    click.echo(f"base clean accuracy {100 * result.base:.2f}%; Pareto front (feasible, screened):")
    click.echo(
        markdown_table(
            ["trial", "defense", "clean %", "drop %", "robust % (screen)", "robust % (full)"],
            [
                [
                    t.number,
                    t.defense().describe(),
                    round(100 * t.clean, 2),
                    round(100 * t.drop, 2),
                    round(100 * t.robust, 1),
                    "-" if t.robust_full is None else round(100 * t.robust_full, 1),
                ]
                for t in result.pareto
            ],
        )  # fmt: skip
    )
    for d, t in result.chosen.items():
        if t is None:
            click.echo(f"delta {100 * d:g}%: no trial meets the constraint; widen --range or add --trials")
        else:
            click.echo(
                f"delta {100 * d:g}%: {t.defense().describe()}  clean {100 * t.clean:.2f}% "
                f"(drop {100 * t.drop:.2f}), robust {100 * t.robust_full:.1f}% at {full_f.budget} queries"
            )
    click.echo(f"written: {', '.join(str(f) for f in files)}", err=True)


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: FOLDER/report.")
def report(folder: str, out: str | None) -> None:
    """Paper-style tables (Markdown, CSV, JSON) and plots from the result stores under FOLDER."""
    from .reports.report import make_report

    result = make_report(folder, out)
    for table in result.tables:
        click.echo(f"\n{table.name}:")
        click.echo(table.markdown())
    click.echo("\nwritten: " + ", ".join(str(f) for f in result.files), err=True)


@cli.command("eval")
@click.option(
    "--model",
    "model_name",
    default="mnist-cnn",
    show_default=True,
    help="mnist-cnn, mnist-vit, timm:<name> or torchvision:<name>.",
)
@click.option(
    "--checkpoint", type=click.Path(dir_okay=False), default=None, help="State-dict file for the model."
)
@click.option(
    "--weights", type=click.Choice(["pretrained", "random"]), default="pretrained", show_default=True
)
@click.option("--num-classes", type=int, default=None, help="Head size of timm/torchvision models.")
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
    help="none (clean accuracy only); score-based: square, signhunter, nes, bandits, simba, simba-dct; "
    "decision-based (labels only): rays, signflip, hsja, boundary, signopt, geoda.",
)
@click.option(
    "--attack-args", default="", help="Attack hyper-parameters, e.g. 'p_init=0.1' or 'lr=0.05,n_samples=20'."
)
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option(
    "--eps",
    type=float,
    default=None,
    help="Threat-model radius in [0, 1] pixel units (default per dataset/model, see README).",
)
@click.option(
    "--budget",
    default="1000,10000",
    show_default=True,
    help="Query budgets to report, comma-separated; one run with the largest.",
)
@click.option("--data", default=None, help="mnist, cifar10 or imagenet (default: the model's own).")
@click.option("--data-root", type=click.Path(), default=None, help="Root folder of cifar10 / imagenet.")
@click.option("--images", type=int, default=1000, show_default=True, help="N images, covering every class.")
@click.option("--passes", type=int, default=3, show_default=True, help="Noisy passes per clean accuracy (M).")
@click.option(
    "--eot",
    type=int,
    default=1,
    show_default=True,
    help="Adaptive attack with M samples per query, each counted: EOT (mean scores) for score-based "
    "attacks, T-query majority label for decision-based ones.",
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
    help="Uncounted passes that must confirm a success on a randomized model.",
)
@click.option("--lucky", is_flag=True, help="Decide success by the single query (RFD Table 15).")
@click.option("--batch-size", type=int, default=128, show_default=True, help="Forward chunk size.")
@click.option(
    "--shard-size",
    type=int,
    default=100,
    show_default=True,
    help="Images attacked together and saved as one unit.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Image selection, noise and attack seed."
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/eval",
    show_default=True,
    help="Output folder; results.sqlite there is resumed when the settings match.",
)
@_common
def eval_(
    model_name: str,
    checkpoint: str | None,
    weights: str,
    num_classes: int | None,
    defense: str,
    attack: str,
    attack_args: str,
    norm: str,
    eps: float | None,
    budget: str,
    data: str | None,
    data_root: str | None,
    images: int,
    passes: int,
    eot: int,
    p_mis: bool,
    votes: int,
    lucky: bool,
    batch_size: int,
    shard_size: int,
    seed: int,
    out: str,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """Evaluate a (defended) model: clean accuracy (mean ± std over M passes) and robust accuracy."""
    from .attacks import ATTACKS
    from .defenses import applicable, parse_defense
    from .evaluation.clean import clean_accuracy
    from .evaluation.defaults import default_attack_args, default_eps
    from .evaluation.protocol import evaluate
    from .evaluation.store import ResultStore
    from .models.data import load_dataset, select_images
    from .models.zoo import default_dataset, load_model
    from .reports.table import markdown_table

    attack = attack.lower()
    if attack != "none" and attack not in ATTACKS:
        raise click.BadParameter(
            f"unknown attack {attack!r}; choose none or one of {', '.join(ATTACKS)}", param_hint="--attack"
        )
    budgets = _parse_budgets(budget)
    if eot < 1:
        raise click.BadParameter(f"M (samples per query) must be >= 1, got {eot}", param_hint="--eot")
    parsed = parse_defense(defense)
    model = load_model(
        model_name,
        checkpoint=checkpoint,
        weights=weights,
        num_classes=num_classes,
        device=device,
        cache_dir=cache_dir,
    )
    data = data or default_dataset(model_name, num_classes=model.num_classes)
    dataset = load_dataset(data, root=data_root, image_size=model.input_shape[-1])
    _check_fits(dataset, model)
    eps = eps if eps is not None else default_eps(model_name, data, norm)
    kwargs = default_attack_args(attack, data, norm) | _parse_kwargs(attack_args)
    chosen = select_images(dataset.labels, images, seed, dataset.num_classes)
    x, y = dataset.load(chosen), dataset.labels[chosen]
    click.echo(
        f"{data}: {len(x)} images (seed {seed}); {attack} {norm} eps={eps:g}, budgets {budgets}, "
        f"M = {passes}, EOT {eot}, device {device}; results in {out}/results.sqlite",
        err=True,
    )
    # Stored under the sites the model has (SINAI on a CNN is its ReLU part); a defense with none of
    # them stays whole, so protect() says which sites are missing.
    restricted = applicable(parsed, model) if parsed.specs else parsed
    stored = restricted if restricted.specs else parsed
    with ResultStore(Path(out) / "results.sqlite") as store:
        result = evaluate(
            model,
            x,
            y,
            attack=attack,
            attack_kwargs=kwargs,
            defense=stored,
            norm=norm,
            eps=eps,
            budgets=budgets,
            seed=seed,
            passes=passes,
            eot=eot,
            votes=votes,
            lucky=lucky,
            batch_size=batch_size,
            shard_size=shard_size,
            dataset_indices=chosen.tolist(),
            store=store,
            describe={"model": model_name, "checkpoint": checkpoint, "dataset": data},
            track_mismatch=p_mis,
        )
    base = clean_accuracy(model, x, y, passes=1, batch_size=batch_size).mean
    headers = ["model", "defense", "clean acc %", "drop %"]
    row = [
        model_name,
        applicable(parsed, model).describe() if parsed.specs else "Base",
        f"{100 * result.clean_mean:.2f} ± {100 * result.clean_std:.2f}",
        f"{100 * (base - result.clean_mean):.2f}",
    ]
    if attack != "none":
        headers += [f"{attack} @{b}" for b in budgets]
        row += [f"{100 * result.robust_accuracy(b):.1f}" for b in budgets]
        spent = [r.success_at for r in result.results if r.success_at is not None]
        headers.append("median queries (broken)")
        row.append(int(statistics.median(spent)) if spent else "-")
    click.echo(markdown_table(headers, [row]))
    if attack != "none":
        _echo_snd_metrics(result, budgets, norm)
    click.echo(f"wall time {result.seconds:.1f} s", err=True)


def _echo_snd_metrics(result: object, budgets: tuple[int, ...], norm: str) -> None:
    """SND's metrics: attack success rate and mean perturbation norm per budget (Table 3), P_mis (Table 5)."""
    from .reports.table import markdown_table

    if not any(r.checkpoint_norms for r in result.results):
        return
    rows = []
    for b in budgets:
        mean = result.mean_norm(b)
        rows.append([b, f"{100 * result.attack_success_rate(b):.1f}", "-" if mean is None else f"{mean:.4f}"])
    click.echo(markdown_table(["queries", "attack success %", f"mean {norm} norm"], rows))
    if result.p_mis is not None:
        click.echo(f"P_mis {result.p_mis:.4f}")


def _parse_kwargs(text: str) -> dict[str, object]:
    """'a=1,b=0.5,c=dct' -> {'a': 1, 'b': 0.5, 'c': 'dct'} (numbers parsed, the rest kept as text)."""
    kwargs: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="--attack-args")
        for cast in (int, float):
            try:
                kwargs[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            kwargs[key.strip()] = {"true": True, "false": False}.get(value.lower(), value)
    return kwargs


def _parse_budgets(text: str) -> tuple[int, ...]:
    try:
        budgets = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise click.BadParameter(
            f"budgets must be integers like 1000,10000, got {text!r}", param_hint="--budget"
        ) from None
    if not budgets or budgets[0] < 1:
        raise click.BadParameter(f"budgets must be positive, got {text!r}", param_hint="--budget")
    return budgets


def _check_fits(dataset: object, model: object) -> None:
    if tuple(dataset.input_shape) != tuple(model.input_shape):
        raise ValueError(
            f"{dataset.name} images have shape {dataset.input_shape}, "
            f"but {model.name} takes {model.input_shape}; "
            "pick the model's dataset with --data, or a model built for this input size"
        )


@cli.command()
@click.option("--model", "model_name", default="mnist-vit", show_default=True)
@click.option(
    "--weights",
    type=click.Choice(["pretrained", "random"]),
    default="random",
    show_default=True,
    help="Sites do not depend on weights; random avoids needing them.",
)
@_common
def sites(model_name: str, weights: str, device: torch.device, cache_dir: str | None) -> None:
    """List the noise sites of a model by kind (what protect() would hook)."""
    from .defenses import describe_sites
    from .models.embedded import EMBEDDED, build_embedded
    from .models.zoo import load_model

    if model_name in EMBEDDED:  # sites do not depend on weights: no need to train
        model = build_embedded(model_name)
    else:
        model = load_model(model_name, weights=weights, device=device, cache_dir=cache_dir)
    for kind, names in describe_sites(model).items():
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        click.echo(f"{kind:8s} {len(names):3d}  {shown or '-'}")


@cli.command()
@click.argument("name", type=click.Choice(["mnist-cnn", "mnist-vit"]))
@click.option("--retrain", is_flag=True, help="Train again even if a cached model exists.")
@_common
def train(name: str, retrain: bool, device: torch.device, cache_dir: str | None) -> None:
    """Train (or load from the cache) an embedded MNIST model and print its test accuracy."""
    from .models.embedded import cache_path, embedded_metrics, load_embedded

    load_embedded(name, cache_dir=cache_dir, device=device, retrain=retrain)
    metrics = embedded_metrics(name, cache_dir=cache_dir) or {}
    click.echo(f"{name}: {cache_path(name, cache_dir)}")
    click.echo(json.dumps(metrics, indent=2, sort_keys=True))


@cli.group()
def bench() -> None:
    """Performance ratios measured in one run (never absolute timings)."""


@bench.command("defenses")
@click.option(
    "--models",
    default=None,
    help="Comma-separated model[@batch] list (default: mnist-cnn@256, mnist-vit@256, "
    "torchvision:resnet18@16, timm:vit_tiny_patch16_224@16; ImageNet-shaped ones use random weights).",
)
@click.option(
    "--defenses",
    "defense_names",
    default=None,
    help="Comma-separated presets; X@threshold = X with thresholds calibrated once.",
)
@click.option(
    "--rounds", type=int, default=7, show_default=True, help="Interleaved timing rounds (median taken)."
)
@click.option("--iters", type=int, default=3, show_default=True, help="Forwards per timing.")
@click.option(
    "--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON."
)
@_common
def bench_defenses(
    models: str | None,
    defense_names: str | None,
    rounds: int,
    iters: int,
    json_out: str | None,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """Protected-forward / unprotected-forward time per preset, same model and batch (target <= 1.05x)."""
    from dataclasses import asdict

    from .bench.defenses import BENCH_PRESETS, DEFAULT_MODELS, bench_models
    from .reports.table import markdown_table

    pairs = DEFAULT_MODELS
    if models:
        pairs = []
        for item in models.split(","):
            name, _, batch = item.strip().rpartition("@") if "@" in item else (item.strip(), "", "")
            pairs.append((name, int(batch) if batch else 64))
    names = tuple(n.strip() for n in defense_names.split(",")) if defense_names else BENCH_PRESETS
    start = time.perf_counter()
    rows = bench_models(pairs, names, device=device, rounds=rounds, iters=iters, cache_dir=cache_dir)
    click.echo(
        f"device {device}, {torch.get_num_threads()} threads, {rounds} rounds x {iters} forwards "
        f"({time.perf_counter() - start:.0f} s)"
    )
    click.echo(
        markdown_table(
            ["model", "batch", "defense", "sites", "clean ms", "defended ms", "ratio"],
            [
                [
                    r.model,
                    r.batch,
                    r.defense,
                    r.sites,
                    round(r.clean_ms, 1),
                    round(r.defended_ms, 1),
                    round(r.ratio, 3),
                ]
                for r in rows
            ],
        )
    )
    if json_out:
        Path(json_out).write_text(json.dumps([asdict(r) for r in rows], indent=2))


@bench.command("attacks")
@click.option("--model", "model_name", default="mnist-cnn", show_default=True)
@click.option("--attacks", "attack_names", default=None, help="Comma-separated attacks (default: all).")
@click.option("--images", type=int, default=100, show_default=True)
@click.option("--budget", type=int, default=200, show_default=True, help="Queries per image for the ratio.")
@click.option("--batch-size", type=int, default=128, show_default=True)
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
@click.option("--peer-images", type=int, default=200, show_default=True)
@click.option("--peer-eps", type=float, default=0.3, show_default=True)
@click.option("--peer-budget", type=int, default=1000, show_default=True)
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
@click.option("--seed", type=int, default=0, show_default=True)
@_common
def bench_attacks(
    model_name: str,
    attack_names: str | None,
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
    seed: int,
    device: torch.device,
    cache_dir: str | None,
) -> None:
    """Queries/s of each attack / the model's forward images/s (target >= 0.9); --peers: Square and
    HopSkipJump vs torchattacks, ART and foolbox."""
    from dataclasses import asdict

    from .attacks import ATTACKS
    from .bench.attacks import compare_hsja, compare_square, measure_attacks
    from .models.data import load_dataset, sample
    from .models.zoo import default_dataset, load_model
    from .reports.table import markdown_table

    model = load_model(model_name, device=device, cache_dir=cache_dir)
    dataset = load_dataset(
        default_dataset(model_name, num_classes=model.num_classes), image_size=model.input_shape[-1]
    )
    names = tuple(a.strip() for a in attack_names.split(",")) if attack_names else ATTACKS
    x, y = sample(dataset, images, seed)
    rows = measure_attacks(
        model, x.to(device), y.to(device), names, budget=budget, batch_size=batch_size, rounds=rounds,
        seed=seed,
    )  # fmt: skip
    click.echo(
        f"{model_name}, {images} images, budget {budget}, batch {batch_size}, device {device}; "
        f"medians of {rounds} rounds. ratio = queries/s / forward images/s (target >= 0.9); "
        "forward_share = fraction of the attack's time inside the model"
    )
    click.echo(
        markdown_table(
            list(asdict(rows[0])),
            [[round(v, 3) if isinstance(v, float) else v for v in asdict(r).values()] for r in rows],
        )
    )
    if peers:
        x, y = sample(dataset, peer_images, seed)
        peer_rows = compare_square(
            model,
            x.to(device),
            y.to(device),
            eps=peer_eps,
            budget=peer_budget,
            batch_size=batch_size,
            rounds=rounds,
            seed=seed,
        )
        click.echo(
            f"\nSquare linf eps={peer_eps}, {peer_budget} queries, {peer_images} images, "
            f"median seconds of {rounds} rounds:"
        )
        click.echo(
            markdown_table(
                ["tool", "images", "seconds", "success %"],
                [[r.tool, r.images, round(r.seconds, 2), round(100 * r.success_rate, 1)] for r in peer_rows],
            )
        )
        x, y = sample(dataset, hsja_images, seed)
        hsja_rows = compare_hsja(
            model, x.to(device), y.to(device), iterations=hsja_iters, batch_size=batch_size, seed=seed
        )
        click.echo(f"\nHopSkipJump l2 untargeted, {hsja_iters} iterations, {hsja_images} images:")
        click.echo(
            markdown_table(
                ["tool", "images", "seconds", "success %", "median l2"],
                [
                    [
                        r.tool,
                        r.images,
                        round(r.seconds, 2),
                        round(100 * r.success_rate, 1),
                        "-" if r.median_norm is None else round(r.median_norm, 3),
                    ]
                    for r in hsja_rows
                ],  # fmt: skip
            )
        )


from .analysis.cli import analyze  # noqa: E402

cli.add_command(analyze)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # sinai never downloads
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="sinai")


if __name__ == "__main__":  # pragma: no cover
    main()
