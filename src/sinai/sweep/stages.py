"""A plan's calibrate and tune stages: defenses found on validation images before the evaluation.

``{calibrate = "FND", drop = 0.01}`` bisects the std of a one-kind preset until the defense costs that
clean-accuracy drop (:func:`sinai.tuning.calibrate.calibrate`; the papers compare defenses at ≈1% and
≈2% drop, RFD section 4.1, SINAI section 5.1). ``{tune = "SINAI", delta = 0.01, trials = N}`` runs
Optuna NSGA-II (:func:`sinai.tuning.tune.tune`, SINAI section 4.3) and takes the configuration chosen
at that delta. Both use the plan's ``validation`` images, drawn first; the evaluated images are drawn
from the rest (as ``sinai demo`` splits MNIST with :func:`sinai.demo.split`), so nothing is tuned on the
images it is judged on.

Stages run in the driver, before the evaluation tasks are expanded: a run of a stage's defense (and
its tasks) exists only once the stage is done. The result is kept in the store's ``meta`` table under
a key of everything it depends on (model, checkpoint, data, validation images, seed, passes, the
stage's settings, and the threat model for tuning), so a re-run, or another driver on the same
PostgreSQL store, reuses it (the first stored result wins). Tuning's working files (the Optuna study,
its screening evaluations, ``tuning.json`` and ``pareto.png``) live in ``STAGES/<model>-SINAI-<key>/``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..defenses import Defense, preset
from ..evaluation.config import EvalConfig
from ..evaluation.store import ResultStore
from ..models.data import select_images
from .plan import DefenseEntry, ModelEntry, Plan, Stage


def split_indices(
    labels: torch.Tensor, n_val: int, n_eval: int, seed: int, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint, seeded, class-covering validation and evaluation indices into ``labels`` (the validation
    set drawn with ``seed``, the evaluation set from the rest with ``seed + 1``: :func:`sinai.demo.split`
    on any dataset)."""
    labels = torch.as_tensor(labels)
    val = select_images(labels, n_val, seed, num_classes)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[val] = False
    remaining = torch.nonzero(rest).flatten()
    if n_eval > len(remaining):
        raise ValueError(
            f"{n_val} validation + {n_eval} evaluation images, but the dataset has {len(labels)} images"
        )
    return val, remaining[select_images(labels[remaining], n_eval, seed + 1, num_classes)]


def stage_settings(plan: Plan, model: ModelEntry, stage: Stage, dataset: str, drop: float | None) -> dict:
    """Everything a stage's result depends on (its key in the store's meta)."""
    from .runs import plan_eps

    settings: dict[str, object] = {
        "stage": stage.kind,
        "preset": stage.preset,
        "model": model.name,
        "checkpoint": model.checkpoint,
        "dataset": dataset,
        "validation": plan.validation,
        "seed": plan.seed,
        "passes": passes_of(plan),
    }
    if stage.kind == "calibrate":
        settings["drop"] = drop
    else:
        screen, full = fidelities(plan, stage)
        settings |= {
            "deltas": list(stage.drops),
            "trials": stage.trials,
            "population": stage.population,
            "screen": list(screen),
            "full": list(full),
            "norm": plan.norm,
            "eps": plan_eps(plan, model, dataset),
        }
    return settings


def stage_key(settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"stage:{settings['stage']}:{settings['model']}:{settings['preset']}:{digest}"


def passes_of(plan: Plan) -> int:
    return int(plan.run.get("passes", EvalConfig().passes))  # type: ignore[call-overload]


def fidelities(plan: Plan, stage: Stage) -> tuple[tuple[int, int], tuple[int, int]]:
    """(images, budget) of the screened and of the promoted trials: the stage's, else (<=50, 200) and
    (<=100, the plan's largest budget)."""
    n = plan.validation or 1
    return stage.screen or (min(50, n), 200), stage.full or (min(100, n), max(plan.budgets))


def run_stage(
    plan: Plan,
    model_entry: ModelEntry,
    entry: DefenseEntry,
    model: nn.Module,
    dataset_name: str,
    dataset,  # noqa: ANN001 - sinai.models.data.Dataset
    val_idx: torch.Tensor,
    *,
    store: ResultStore,
    folder: str | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Defense | None:
    """The defense of ``entry``'s stage on ``model``: from the store's meta, else computed on the
    validation images and stored. None when the stage gives no defense for this model (the preset has
    no site in it, or no tuned configuration kept the drop within delta): the entry's runs are left out."""
    say = log or (lambda _msg: None)
    stage = entry.stage
    assert stage is not None and entry.drop is not None
    label = f"{model_entry.name}: {entry.method} {entry.level}"
    if stage.kind == "calibrate":
        try:
            preset(stage.preset).for_model(model)
        except ValueError:
            say(f"{label}: {stage.preset} has no site in {model_entry.name}; left out")
            return None
    settings = stage_settings(plan, model_entry, stage, dataset_name, entry.drop)
    key = stage_key(settings)
    saved = store.meta(key)
    if saved is None:
        xv, yv = dataset.load(val_idx).to(device), dataset.labels[val_idx].long().to(device)
        if stage.kind == "calibrate":
            value = _calibrate(plan, stage, entry.drop, model, xv, yv)
        else:
            work = Path(folder or "stages") / re.sub(r"[^\w.-]", "_", f"{model_entry.name}-SINAI-{key[-12:]}")
            value = _tune(plan, model_entry, stage, settings, model, xv, yv, work, say)
        value["settings"] = settings
        if store.meta(key) is None:  # another driver may have stored it meanwhile: the first one wins
            store.set_meta(key, json.dumps(value))
        saved, how = store.meta(key), "done"
    else:
        how = "from the store"
    value = json.loads(saved)
    if stage.kind == "calibrate":
        say(
            f"{label}: {stage.preset} std {value['std']:.4g} -> drop {100 * value['drop']:.2f}% (target "
            f"{100 * entry.drop:g}%{'' if value['reached'] else ', NOT reached'}; {how})"
        )
        return Defense.from_dict(value["defense"])
    chosen = value["chosen"].get(f"{entry.drop:g}")
    if chosen is None:
        say(f"{label}: no tuned configuration within {100 * entry.drop:g}% drop; left out ({how})")
        return None
    defense = Defense.from_dict(chosen["defense"])
    say(f"{label}: {defense.describe()} ({how})")
    return defense


def _calibrate(plan: Plan, stage: Stage, drop: float, model: nn.Module, xv, yv) -> dict:  # noqa: ANN001
    from ..tuning import calibrate as calibration

    result = calibration.calibrate(
        model, xv, yv, preset(stage.preset), drop=drop, passes=passes_of(plan), seed=plan.seed,
        batch_size=plan.batch_size,
    )  # fmt: skip
    return {**result.as_dict(), "defense": result.defense.to_dict()}


def _tune(
    plan: Plan,
    model_entry: ModelEntry,
    stage: Stage,
    settings: dict,
    model: nn.Module,
    xv: torch.Tensor,
    yv: torch.Tensor,
    work: Path,
    say: Callable[[str], None],
) -> dict:
    from ..attacks.threat import ThreatModel
    from ..reports.report import write_tuning
    from ..tuning import tune as tuning

    work.mkdir(parents=True, exist_ok=True)
    screen, full = fidelities(plan, stage)
    say(
        f"{model_entry.name}: tune SINAI ({stage.trials} NSGA-II trials, delta {list(stage.drops)}) in {work}"
    )
    with ResultStore(work / "results.sqlite") as tune_store:
        result = tuning.tune(
            model, xv, yv, deltas=stage.drops, model_name=model_entry.name, trials=stage.trials,
            population=stage.population, passes=passes_of(plan), screen=tuning.Fidelity(*screen),
            full=tuning.Fidelity(*full), threat=ThreatModel(plan.norm, float(settings["eps"])),
            storage=f"sqlite:///{(work / 'study.sqlite').resolve()}", study_name=f"{model_entry.name}-sinai",
            store=tune_store, seed=plan.seed, batch_size=plan.batch_size, progress=False, log=say,
        )  # fmt: skip
    assert result is not None
    write_tuning(result, work, model_entry.name)
    chosen = {
        f"{d:g}": None if t is None else {**t.as_dict(), "defense": t.defense().to_dict()}
        for d, t in result.chosen.items()
    }
    return {"base": result.base, "trials": len(result.trials), "chosen": chosen, "folder": str(work)}
