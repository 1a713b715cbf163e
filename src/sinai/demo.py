"""``sinai demo``: the main job on the embedded default (two MNIST models, nothing downloaded), run as a
built-in sweep plan (:func:`demo_plan`; ``sinai demo --plan`` prints it) by the same machinery as
``sinai sweep`` — ledger, executors and stages — so it resumes, and runs on several processes or a Ray
cluster (``--workers``, ``--executor ray``).

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
   others) with the papers' protocol.
6. Write the report folder (tables as Markdown/CSV/JSON, plots); ``sinai demo`` prints its tables, the
   ``worst_case`` table last: per defense, the robust accuracy no attack got below (an image counts
   only if no attack broke it) and its gap to the best query attack.

Every stage resumes: calibrations and tuning choices are kept in the store, every finished shard is a
row of the ledger, so a killed demo picks up where it stopped and a finished one only re-prints its report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .attacks import ATTACKS, ThreatModel
from .evaluation.defaults import MNIST_EPS, default_attack_args
from .reports.report import STORE_NAME, Report, make_report
from .sweep import SweepStatus, run_sweep
from .sweep.plan import parse_plan
from .tuning.tune import Fidelity

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


def _toml(value: object) -> str:
    """``value`` as TOML (strings, numbers, booleans, lists and inline tables of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def demo_plan(
    *,
    quick: bool = False,
    eval_images: int | None = None,
    budget: int | None = None,
    trials: int | None = None,
    attacks: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
    trained: bool = False,
    seed: int = 0,
) -> str:
    """The demo as a sweep plan's TOML text (see the module docstring); ``sinai sweep`` runs it as well.
    Bad sizes or names raise ``ValueError``."""
    cfg = replace(DemoConfig.preset(quick), trained=trained)
    _positive("the number of evaluation images", eval_images)
    _positive("the query budget", budget)
    _positive("the number of trials", trials)
    budget = budget or cfg.budget
    attacks = check_names(attacks, ATTACKS, "attack") if attacks else demo_attacks()
    models = check_names(models, MODELS, "model") if models else MODELS
    defenses: list[object] = ["none"]
    if cfg.adversarial:  # PGD-AT: the undefended adversarially trained network noise is compared to
        defenses.append({"defense": "none", "method": "PGD-AT", "variant": "adv"})
    if cfg.trained:
        defenses += [{"defense": method, "method": method, "variant": kind} for kind, method in TRAINED]
    defenses += [{"calibrate": method, "drop": list(cfg.drops)} for method in CALIBRATED]
    screen, full = [cfg.screen.images, cfg.screen.budget], [cfg.full.images, cfg.full.budget]
    defenses.append(
        {"tune": "SINAI", "delta": list(cfg.drops), "trials": trials or cfg.trials,
         "population": cfg.population, "screen": screen, "full": full}
    )  # fmt: skip
    lines = [
        f"# sinai demo{' --quick' if quick else ''}: the built-in plan (run it with `sinai sweep FILE`)",
        f'name = "demo{"-quick" if quick else ""}"',
        f"models = {_toml(list(models))}",
        "defenses = [",
        *(f"    {_toml(d)}," for d in defenses),
        "]",
        f"attacks = {_toml(list(attacks))}",
        f"budgets = [{budget}]",
        f"images = {eval_images or cfg.eval_images}",
        f"validation = {cfg.val_images}",
        f"seed = {seed}",
        'norm = "linf"',
        f"eps = {MNIST_EPS['linf']}",
        f"passes = {cfg.passes}",
    ]
    for attack in attacks:
        args = demo_attack_args(attack, "linf", budget)
        if args:
            lines += ["", f"[attack_args.{attack}]", *(f"{k} = {_toml(v)}" for k, v in args.items())]
    return "\n".join(lines) + "\n"


def _positive(what: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value}")


@dataclass(frozen=True)
class DemoResult:
    """What a demo wrote: the report (its tables and files), on ``images`` evaluation images per model
    under ``threat``, and the sweep's final status."""

    report: Report
    images: int
    threat: ThreatModel
    status: SweepStatus


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
    executor: str = "local",
    workers: int = 1,
    address: str | None = None,
    device: torch.device | str = "cpu",
    cache_dir: str | None = None,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Run the demo's built-in plan (:func:`demo_plan`) into ``out`` with ``executor`` and ``workers`` (as
    ``sinai sweep`` would), then write its report; ``log`` is told every step."""
    text = demo_plan(
        quick=quick, eval_images=eval_images, budget=budget, trials=trials, attacks=attacks,
        models=models, trained=trained, seed=seed,
    )  # fmt: skip
    plan = parse_plan(text, source="<sinai demo plan>", name="demo")
    say = log or (lambda _msg: None)
    out.mkdir(parents=True, exist_ok=True)
    threat = ThreatModel(plan.norm, float(plan.eps))  # type: ignore[arg-type]
    say(
        f"sinai demo{' --quick' if quick else ''}: {plan.validation} validation / {plan.images} evaluation "
        f"MNIST images, linf eps {threat.eps}, {plan.budgets[-1]} queries, models "
        f"{', '.join(m.name for m in plan.models)}, attacks {', '.join(plan.attacks)}; {workers} "
        f"{executor} worker(s); output {out}"
    )
    status, outcome = run_sweep(
        plan, store=str(out / STORE_NAME), executor=executor, workers=workers, address=address,
        device=str(device), cache_dir=cache_dir, log=say,
    )  # fmt: skip
    if not status.done:
        failed = sum(r.failed for r in status.runs)
        raise RuntimeError(
            f"the demo left {sum(r.left for r in status.runs)} task(s) undone ({failed} failed: "
            f"{'; '.join(outcome.errors[:3]) or 'see the log'}); run it again to retry them"
        )
    return DemoResult(make_report(out), plan.images, threat, status)
