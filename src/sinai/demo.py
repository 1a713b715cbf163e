"""``sinai demo``: the main job on the embedded default (two MNIST models, nothing downloaded).

1. Train (once, cached) or load the embedded CNN and ViT, and (full demo) the CNN's PGD-AT model
   ``mnist-cnn-at``: its undefended row "PGD-AT" is the defense every reader compares noise against.
   ``--trained`` adds the trained defenses of the CNN: MFDV-SNN (``mnist-cnn-mfdv`` with the ``MFDV``
   preset, one noisy pass per query; seed 004) and SINAI-selective (``mnist-cnn-selective`` at r = 0.9;
   seed 001), each trained once and cached.
2. Split the 1000 MNIST test images into a validation set (calibration and tuning) and a disjoint
   evaluation set (the table), both seeded and class-covering.
3. Calibrate RND, FND and SINAI-Attn (the ViT only) to ≈1% and ≈2% clean-accuracy drop.
4. Tune SINAI with Optuna NSGA-II under delta = 2% and choose the best configuration at ≈1% and ≈2%.
5. Evaluate the undefended model and every calibrated / tuned defense under Square, SignHunter, NES,
   the decision-based RayS and SignFlip and the transfer attack from the undefended model (Square
   crafted on the base model with the demo's budget, judged on the defended one; ``attacks`` picks
   others) with the papers' protocol; a defense that appears twice (one tuned configuration for both
   drops) is attacked once.
6. Write the report folder (tables as Markdown/CSV/JSON, plots); ``sinai demo`` prints its tables, the
   ``worst_case`` table last: per defense, the robust accuracy no attack got below (an image counts
   only if no attack broke it) and its gap to the best query attack.

Every stage resumes: calibrations are saved as they finish, the Optuna study and all evaluations live in
SQLite files, so a killed demo picks up where it stopped and a finished one only re-prints its report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .attacks import ATTACKS, ThreatModel
from .defenses import Defense, preset
from .evaluation.config import EvalConfig
from .evaluation.defaults import MNIST_EPS, default_attack_args
from .evaluation.protocol import EvalResult, evaluate
from .evaluation.store import ResultStore
from .models.data import mnist, select_images
from .models.embedded import ADVERSARIAL, VARIANTS
from .models.zoo import load_model
from .reports.report import Report, make_report, write_tuning
from .tuning.calibrate import calibrate
from .tuning.tune import Fidelity, tune

MODELS = ("mnist-cnn", "mnist-vit")
TRAINED = (("selective", "SINAI-selective"), ("mfdv", "MFDV"))
"""The trained defenses ``--trained`` adds: (variant kind, the preset that deploys it)."""
CALIBRATED = ("RND", "FND", "SINAI-Attn")  # one-kind defenses; SINAI-Attn only where attention exists
SCORE_ATTACKS = ("square", "signhunter", "nes")
DECISION_ATTACKS = ("rays", "signflip")
TRANSFER_ARGS: dict[str, object] = {"source": "base", "attack": "square"}
"""The demo's transfer attack: Square crafted on the undefended model itself (leaked weights), with the
demo's query budget on that model, judged on the defended one."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run (the full one, or ``--quick``)."""

    val_images: int
    eval_images: int
    budget: int
    drops: tuple[float, ...]
    trials: int
    population: int
    screen: Fidelity
    full: Fidelity
    passes: int = 3
    adversarial: bool = True  # a PGD-AT row (the adversarially trained model, undefended) where one exists
    trained: bool = False  # rows of the trained defenses (MFDV-SNN, SINAI-selective) where they exist

    @staticmethod
    def preset(quick: bool) -> DemoConfig:
        if quick:
            return DemoConfig(
                val_images=200, eval_images=50, budget=200, drops=(0.01, 0.02), trials=4, population=2,
                screen=Fidelity(20, 100), full=Fidelity(30, 200), adversarial=False,
            )  # fmt: skip
        return DemoConfig(
            val_images=500, eval_images=50, budget=1000, drops=(0.01, 0.02), trials=12, population=4,
            screen=Fidelity(50, 200), full=Fidelity(50, 1000),
        )  # fmt: skip


def demo_attacks() -> tuple[str, ...]:
    """The attacks of the demo table: the score-based three, RayS/SignFlip and the transfer attack."""
    return (*SCORE_ATTACKS, *DECISION_ATTACKS, "transfer")


def demo_attack_args(attack: str, norm: str, budget: int) -> dict[str, object]:
    """The demo's keyword arguments for ``attack``: the MNIST defaults (``default_attack_args``); for
    ``transfer`` :data:`TRANSFER_ARGS` with ``queries=budget`` on the source and the crafting attack's
    MNIST defaults."""
    if attack != "transfer":
        return default_attack_args(attack, "mnist", norm)
    inner = default_attack_args(str(TRANSFER_ARGS["attack"]), "mnist", norm)
    return {**TRANSFER_ARGS, "queries": budget, **({"attack_args": inner} if inner else {})}


def check_names(names: Sequence[str], known: Sequence[str], what: str) -> tuple[str, ...]:
    """``names`` with duplicates dropped; unknown ones are a ``ValueError`` listing the known ones."""
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    return tuple(dict.fromkeys(names))


def split(n_val: int, n_eval: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, class-covering validation and evaluation indices into the MNIST test split."""
    labels = mnist("test").labels
    val = select_images(labels, n_val, seed, num_classes=10)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[val] = False
    remaining = torch.nonzero(rest).flatten()
    ev = remaining[select_images(labels[remaining], n_eval, seed + 1, num_classes=10)]
    return val, ev


def save_calibration(path: Path, key: str, value: dict) -> None:
    """Add one calibration to the file, keeping what another demo sharing the folder wrote meanwhile."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[key] = value
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(saved, indent=2) + "\n")
    tmp.replace(path)


def _level(drop: float) -> str:
    return f"≈{100 * drop:g}%"


@dataclass(frozen=True)
class DemoResult:
    """What a demo wrote: the report (its tables and files), on ``images`` evaluation images per model
    under ``threat``."""

    report: Report
    images: int
    threat: ThreatModel


def _positive(what: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value}")


def run_demo(
    *,
    out: Path,
    quick: bool = False,
    eval_images: int | None = None,
    budget: int | None = None,
    trials: int | None = None,
    attacks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    trained: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    cache_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring); ``log`` is told every step. Bad sizes or names raise
    ``ValueError``."""
    cfg = replace(DemoConfig.preset(quick), trained=trained)
    _positive("the number of evaluation images", eval_images)
    _positive("the query budget", budget)
    _positive("the number of trials", trials)
    n_eval = eval_images or cfg.eval_images
    budget = budget or cfg.budget
    trials = trials or cfg.trials
    attacks = check_names(attacks, ATTACKS, "attack") if attacks else demo_attacks()
    models = check_names(models, MODELS, "model") if models else MODELS
    say = log or (lambda _msg: None)
    out.mkdir(parents=True, exist_ok=True)
    data = mnist("test")
    val_idx, eval_idx = split(cfg.val_images, n_eval, seed)
    xv, yv = data.load(val_idx).to(device), data.labels[val_idx].to(device)
    xe, ye = data.load(eval_idx), data.labels[eval_idx]
    threat = ThreatModel("linf", MNIST_EPS["linf"])
    say(
        f"sinai demo{' --quick' if quick else ''}: {len(val_idx)} validation / {n_eval} evaluation MNIST "
        f"images, linf eps {threat.eps}, {budget} queries, models {', '.join(models)}, "
        f"attacks {', '.join(attacks)}; output {out}"
    )
    calib_path = out / "calibration.json"
    calibrations: dict[str, dict] = json.loads(calib_path.read_text()) if calib_path.exists() else {}

    rows: list[tuple[str, str, Defense, nn.Module]] = []  # (method, level, defense, model) per model
    with ResultStore(out / "results.sqlite") as store:
        for model_name in models:
            say(f"{model_name}: load or train")
            model = load_model(model_name, device=device, cache_dir=cache_dir)
            rows = [("Base", "", Defense(name="none"), model)]
            if cfg.adversarial and model_name in ADVERSARIAL:  # PGD-AT: the method noise is compared to
                say(f"{model_name}: load or train its PGD-AT model {ADVERSARIAL[model_name]}")
                at_model = load_model(ADVERSARIAL[model_name], device=device, cache_dir=cache_dir)
                rows.append(("PGD-AT", "", Defense(name="none"), at_model))
            if cfg.trained:
                for kind, method in TRAINED:
                    variant = VARIANTS[kind].get(model_name)
                    if variant is None:
                        continue
                    say(f"{model_name}: load or train its {method} model {variant}")
                    trained_model = load_model(variant, device=device, cache_dir=cache_dir)
                    rows.append((method, "", preset(method), trained_model))

            # ----------------------------------------------------------------- calibration
            for method in CALIBRATED:
                if method == "SINAI-Attn" and model_name != "mnist-vit":
                    continue
                for drop in cfg.drops:
                    key = f"{model_name}|{method}|{drop:g}|{len(val_idx)}|{seed}"
                    if key not in calibrations:
                        c = calibrate(model, xv, yv, preset(method), drop=drop, passes=cfg.passes, seed=seed)
                        calibrations[key] = c.as_dict()
                        save_calibration(calib_path, key, calibrations[key])
                    c = calibrations[key]
                    say(
                        f"{model_name}: {method} std {c['std']:.4g} -> drop {100 * c['drop']:.2f}% "
                        f"(target {100 * drop:g}%{'' if c['reached'] else ', NOT reached'})"
                    )
                    kind = c["kind"]
                    rows.append((method, _level(drop), preset(method, **{kind: {"std": c["std"]}}), model))

            # ---------------------------------------------------------------------- tuning
            folder = out / "tune" / model_name
            folder.mkdir(parents=True, exist_ok=True)
            say(f"{model_name}: tune SINAI ({trials} NSGA-II trials, δ {', '.join(map(_level, cfg.drops))})")
            with ResultStore(folder / "results.sqlite") as tune_store:
                result = tune(
                    model, xv, yv, deltas=cfg.drops, model_name=model_name, trials=trials,
                    population=cfg.population, passes=cfg.passes, screen=cfg.screen, full=cfg.full,
                    threat=threat, storage=f"sqlite:///{(folder / 'study.sqlite').resolve()}",
                    study_name=f"{model_name}-sinai", store=tune_store, seed=seed, log=say,
                )  # fmt: skip
            write_tuning(result, folder, model_name)
            for drop, chosen in result.chosen.items():
                if chosen is None:
                    say(f"{model_name}: no tuned configuration within {_level(drop)} drop")
                    continue
                say(f"{model_name}: SINAI {_level(drop)}: {chosen.defense().describe()}")
                rows.append(("SINAI", _level(drop), chosen.defense(), model))

            # ------------------------------------------------------------------ evaluation
            evaluated: dict[tuple[int, str, str], EvalResult] = {}  # (model, defense, attack) -> run
            for method, level, defense, target in rows:
                for attack in attacks:
                    describe = {"model": model_name, "dataset": "mnist", "method": method, "level": level}
                    network = getattr(target, "name", model_name)
                    if network != model_name:  # the row's own network (PGD-AT, the trained defenses)
                        describe["network"] = network
                    same = evaluated.get((id(target), defense.describe(), attack))
                    if same is not None:  # e.g. tuning chose one configuration for both drops
                        say(f"{model_name}: {method} {level} under {attack}: same defense as above, reused")
                        store.copy_run({**same.settings, **describe}, same.clean, same.results)
                        continue
                    say(f"{model_name}: {method} {level} under {attack}")
                    config = EvalConfig(
                        attack=attack, attack_args=demo_attack_args(attack, threat.norm, budget),
                        defense=defense, threat=threat, budgets=(budget,), seed=seed, passes=cfg.passes,
                        describe=describe,
                    )  # fmt: skip
                    evaluated[id(target), defense.describe(), attack] = evaluate(
                        target, xe, ye, config, dataset_indices=eval_idx.tolist(), store=store
                    )
    return DemoResult(make_report(out), n_eval, threat)
