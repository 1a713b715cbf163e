"""``sinai analyze <what>``: the analyses behind the papers' figures, each writing CSV + PNG to ``--out``.

Registered in ``sinai.cli`` with one line (``cli.add_command(analyze)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from tqdm.auto import tqdm

EMBEDDED_DEFAULT = ("mnist-cnn", "mnist-vit")


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=what) from None


def _names(text: str | None) -> list[str] | None:
    return [v.strip() for v in text.split(",") if v.strip()] if text else None


def _options(what: str, images: int) -> Callable:
    """Options every analysis shares: models, data, sizes, threat model, output, device."""

    def decorate(fn: Callable) -> Callable:
        @click.option(
            "--model",
            "models",
            multiple=True,
            default=EMBEDDED_DEFAULT,
            show_default=True,
            help="Model name (any name load_model accepts: mnist-cnn, mnist-vit, timm:<name>, "
            "torchvision:<name>); repeat for several.",
        )
        @click.option("--checkpoint", type=click.Path(dir_okay=False), default=None, help="State-dict file.")
        @click.option("--num-classes", type=int, default=None, help="Head size of timm/torchvision models.")
        @click.option("--data", default=None, help="mnist, cifar10 or imagenet (default: the model's own).")
        @click.option(
            "--data-root", type=click.Path(), default=None, help="Root folder of cifar10 / imagenet."
        )
        @click.option(
            "--images", type=int, default=images, show_default=True, help="Images for clean-data measures."
        )
        @click.option(
            "--robust-images",
            type=int,
            default=50,
            show_default=True,
            help="Images attacked with Square for robust accuracy (0: skip the attacks).",
        )
        @click.option("--budget", type=int, default=100, show_default=True, help="Square query budget.")
        @click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
        @click.option(
            "--eps", type=float, default=None, help="Attack radius (default per dataset; MNIST linf 0.1)."
        )
        @click.option(
            "--passes", type=int, default=3, show_default=True, help="Noisy passes per clean accuracy."
        )
        @click.option(
            "--seed", type=int, default=0, show_default=True, help="Image selection and noise seed."
        )
        @click.option(
            "--out",
            type=click.Path(file_okay=False),
            default=f"runs/analyze/{what}",
            show_default=True,
            help="Output folder for the CSV and PNG files.",
        )
        @click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
        @click.option(
            "--cache-dir",
            type=click.Path(file_okay=False),
            default=None,
            help="Cache of the trained embedded models (default: $SINAI_CACHE_DIR or the user cache).",
        )
        @functools.wraps(fn)
        def wrapper(**kwargs: object) -> object:
            for key in ("images", "passes", "budget"):
                if kwargs[key] < 1:
                    raise click.BadParameter(f"must be >= 1, got {kwargs[key]}", param_hint=f"--{key}")
            if kwargs["robust_images"] < 0:
                raise click.BadParameter("must be >= 0", param_hint="--robust-images")
            return fn(**kwargs)

        return wrapper

    return decorate


class _Setup:
    """One model with its images: ``x, y`` for clean measures, ``robust`` for attacks (or ``None``)."""

    def __init__(self, name: str, model, x, y, robust, eps: float) -> None:
        self.name, self.model, self.x, self.y, self.robust, self.eps = name, model, x, y, robust, eps


def _setups(kw: dict) -> Iterator[_Setup]:
    from ..device import resolve_device
    from ..evaluation.defaults import default_eps
    from ..models.data import load_dataset, sample
    from ..models.zoo import default_dataset, load_model

    device = resolve_device(kw["device"])
    for name in kw["models"]:
        model = load_model(
            name,
            checkpoint=kw["checkpoint"],
            num_classes=kw["num_classes"],
            device=device,
            cache_dir=kw["cache_dir"],
        )
        data = kw["data"] or default_dataset(name, num_classes=model.num_classes)
        dataset = load_dataset(data, root=kw["data_root"], image_size=model.input_shape[-1])
        x, y = sample(dataset, kw["images"], kw["seed"])
        robust = sample(dataset, kw["robust_images"], kw["seed"]) if kw["robust_images"] else None
        eps = kw["eps"] if kw["eps"] is not None else default_eps(name, data, kw["norm"])
        yield _Setup(name, model, x, y, robust, eps)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step")


@click.group()
def analyze() -> None:
    """Analyses behind the papers' figures (SINAI Fig. 1-4, RFD Fig. 1, Tables 6/14): CSV + PNG files."""


@analyze.command()
@_options("sensitivity", images=500)
@click.option(
    "--stds",
    default="0,0.05,0.1,0.2,0.4,0.8,1.6",
    show_default=True,
    help="Noise stds to sweep (comma-separated).",
)
@click.option(
    "--kinds",
    default=None,
    help="Site kinds (default: every one the model has of attn,gelu,relu,input,feature).",
)
@click.option(
    "--layer", default=None, help="Module whose output the MSE is measured at (default: a middle layer)."
)
def sensitivity(stds: str, kinds: str | None, layer: str | None, **kw: object) -> None:
    """Clean accuracy, mid-layer MSE and Square robust accuracy vs noise std, one site kind at a time."""
    from . import plots
    from .common import check_stds, write_csv
    from .sensitivity import sensitivity_summary, site_kinds, sweep_sensitivity

    std_values = check_stds(_floats(stds, "--stds"))
    out = Path(kw["out"])
    rows = []
    for setup in _setups(kw):
        chosen = site_kinds(setup.model, _names(kinds))
        with _bar(len(chosen) * len(std_values), f"sensitivity {setup.name}") as bar:
            rows += sweep_sensitivity(
                setup.model,
                setup.x,
                setup.y,
                kinds=chosen,
                stds=std_values,
                passes=kw["passes"],
                seed=kw["seed"],
                layer=layer,
                robust=setup.robust,
                budget=kw["budget"],
                eps=setup.eps,
                norm=kw["norm"],
                name=setup.name,
                on_step=bar.update,
            )
    dicts = [r.as_dict() for r in rows]
    summary = sensitivity_summary(rows)
    files = [write_csv(out / "sensitivity.csv", dicts), write_csv(out / "sensitivity_summary.csv", summary)]
    files += [plots.sensitivity_clean(dicts, out / "sensitivity_clean.png")]
    files += [plots.sensitivity_mse(dicts, out / "sensitivity_mse.png")]
    if any(r.robust is not None for r in rows):
        files += [plots.sensitivity_robust(dicts, out / "sensitivity_robust.png", kw["budget"])]
    _print_summary(summary)
    _print_files(files)


@analyze.command()
@_options("gradnorm", images=300)
@click.option("--kinds", default=None, help="gelu and/or relu (default: those the model has).")
@click.option(
    "--std",
    default="auto",
    show_default=True,
    help="Noise std for the ratio sweep; 'auto': the std at which uniform noise costs --drop clean accuracy.",
)
@click.option(
    "--drop", type=float, default=0.05, show_default=True, help="Clean drop of uniform noise for --std auto."
)
@click.option("--ratios", default="0,0.25,0.5,0.75,1", show_default=True, help="Injection ratios to sweep.")
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
@click.option("--loss", type=click.Choice(["margin", "ce"]), default="margin", show_default=True)
def gradnorm(
    kinds: str | None,
    std: str,
    drop: float,
    ratios: str,
    stat_images: int,
    agreement_ratio: float,
    loss: str,
    **kw,
) -> None:
    """Per-logit gradient norms before GeLU/ReLU, critical- vs non-critical-first noise, proxy agreement."""
    from . import plots
    from .common import check_ratios, check_stds, write_csv
    from .gradnorm import (
        RULES,
        gradient_norms,
        histogram,
        rank_agreement,
        ratio_sweep,
        selective_sites,
        uniform_std,
    )

    ratio_values = check_ratios(_floats(ratios, "--ratios"))
    check_ratios([agreement_ratio])
    fixed_std = None if std == "auto" else check_stds(_floats(std, "--std"))[0]
    out = Path(kw["out"])
    stats, hist_rows, pooled, sweep, agreement = [], [], {}, [], []
    for setup in _setups(kw):
        from ..defenses import find_sites

        found = find_sites(setup.model, ["gelu", "relu"])
        chosen = _names(kinds) or [k for k in ("gelu", "relu") if found[k]]
        for kind in chosen:
            selective_sites(setup.model, kind)
        xs, ys = setup.x[:stat_images], setup.y[:stat_images]
        s, p = gradient_norms(setup.model, xs, ys, kinds=chosen, loss=loss, name=setup.name)
        stats += [r.as_dict() for r in s]
        for kind, values in p.items():
            pooled[(setup.name, kind)] = values
            hist_rows += [{"model": setup.name, "kind": kind, **h} for h in histogram(values)]
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
                sweep += [
                    r.as_dict()
                    for r in ratio_sweep(
                        setup.model,
                        setup.x,
                        setup.y,
                        kind,
                        std=kind_std,
                        ratios=ratio_values,
                        passes=kw["passes"],
                        seed=kw["seed"],
                        loss=loss,
                        robust=setup.robust,
                        budget=kw["budget"],
                        eps=setup.eps,
                        norm=kw["norm"],
                        name=setup.name,
                        on_step=bar.update,
                    )
                ]
                bar.update(steps - bar.n)
    files = [
        write_csv(out / "gradnorm_stats.csv", stats),
        write_csv(out / "gradnorm_hist.csv", hist_rows),
        write_csv(out / "gradnorm_ratio.csv", sweep),
        write_csv(out / "gradnorm_agreement.csv", agreement),
        plots.gradnorm_hist(pooled, out / "gradnorm_hist.png"),
        plots.ratio_sweep(sweep, out / "gradnorm_ratio.png", kw["budget"]),
        plots.rank_agreement(agreement, out / "gradnorm_agreement.png"),
    ]
    from ..reports.table import markdown_table

    pooled_stats = [r for r in stats if r["site"] == "all"]
    click.echo(
        markdown_table(
            ["model", "kind", "median |dL/dz|", "p95", "zero share"],
            [
                [r["model"], r["kind"], f"{r['median']:.3g}", f"{r['p95']:.3g}", round(r["zero_share"], 3)]
                for r in pooled_stats
            ],
        )
    )
    _print_files(files)


@analyze.command()
@_options("theory", images=200)
@click.option(
    "--layers",
    default=None,
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
    help="Std of the attacker's directions u (comma-separated).",
)
@click.option("--flip-images", type=int, default=50, show_default=True, help="Images for the flip test.")
@click.option("--directions", type=int, default=64, show_default=True, help="Random directions per image.")
def theory(
    layers: str | None,
    std: float,
    drop: float,
    step: float,
    flip_std: float,
    probe_std: str,
    flip_images: int,
    directions: int,
    **kw,
) -> None:
    """RFD Theorem 1: gradient-norm ratios per layer, predicted vs measured flip rate, per-layer sweep."""
    from . import plots
    from .common import check_stds, write_csv
    from .probes import default_layers
    from .theory import flip_rates, gradient_ratios, layer_sweep

    probes = check_stds(_floats(probe_std, "--probe-std"))
    check_stds([std, flip_std])
    out = Path(kw["out"])
    ratio_rows, flip_rows, sweep_rows = [], [], []
    for setup in _setups(kw):
        chosen = _names(layers) or ["input", *default_layers(setup.model)]
        ratios = gradient_ratios(setup.model, setup.x, setup.y, chosen, step=step, name=setup.name)
        ratio_rows += ratios
        with _bar(len(chosen) * (len(probes) + 1), f"theory {setup.name}") as bar:
            for p in probes:
                for layer in chosen:
                    flip_rows += flip_rates(
                        setup.model,
                        setup.x[:flip_images],
                        setup.y[:flip_images],
                        layer,
                        std=flip_std,
                        probe_std=p,
                        directions=directions,
                        seed=kw["seed"],
                        name=setup.name,
                    )
                    bar.update()
            sweep_rows += layer_sweep(
                setup.model,
                setup.x,
                setup.y,
                chosen,
                std=std,
                drop=drop,
                passes=kw["passes"],
                seed=kw["seed"],
                ratios=ratios,
                robust=setup.robust,
                budget=kw["budget"],
                eps=setup.eps,
                norm=kw["norm"],
                name=setup.name,
                on_step=bar.update,
            )
    files = [
        write_csv(out / "theory_ratios.csv", ratio_rows),
        write_csv(out / "theory_flips.csv", flip_rows),
        write_csv(out / "theory_layers.csv", sweep_rows),
        plots.theory_ratios(ratio_rows, out / "theory_ratios.png"),
        plots.theory_flips(flip_rows, out / "theory_flips.png"),
        plots.theory_layers(sweep_rows, out / "theory_layers.png", kw["budget"]),
    ]
    from ..reports.table import markdown_table

    table = []
    for r in sweep_rows:
        sel = [f for f in flip_rows if (f["model"], f["layer"]) == (r["model"], r["layer"])]
        table.append(
            [
                r["model"],
                r["layer"],
                f"{sum(f['predicted'] for f in sel) / len(sel):.3f}",
                f"{sum(f['measured'] for f in sel) / len(sel):.3f}",
                f"{r['grad_norm_mean']:.3g}",
                _pct(r["robust_fixed"]),
                f"{r['std_calibrated']:.3g}",
                _pct(r["robust_calibrated"]),
                _fmt(r["ratio_change_median"]),
            ]
        )
    headers = ["model", "layer", "P predicted", "P measured", "mean grad norm", f"robust (std {std:g})"]
    headers += ["std for drop", "robust (calibrated)", "ratio change"]
    click.echo(markdown_table(headers, table))
    _print_files(files)


def _pct(value: object) -> str:
    return "-" if value in ("", None) else f"{100 * value:.1f}"


def _print_summary(summary: list[dict]) -> None:
    from ..reports.table import markdown_table

    headers = list(summary[0]) if summary else []
    click.echo(markdown_table(headers, [[_fmt(v) for v in r.values()] for r in summary]))


def _fmt(value: object) -> object:
    return f"{value:.3g}" if isinstance(value, float) else value


def _print_files(files: list[Path]) -> None:
    click.echo("wrote " + ", ".join(str(f) for f in files), err=True)
