"""From a plan to the ledger's runs and tasks, and the work of one task in any worker process.

A run of a sweep is an ordinary run of the result store: the same ``EvalConfig`` and settings that
``sinai eval`` makes, so ``sinai report`` reads it and an eval with the same settings resumes it. Its
tasks are the clean accuracy (shard -1) and the attack's shards (0, 1, ...). A worker needs only the
store and the run id: it rebuilds the configuration from the stored settings (checked to give the same
key), loads the model and images once per process, and runs the evaluation protocol's own shard code,
which seeds noise and attack from (seed, shard) — so the numbers do not depend on who runs a shard or
when (SINAI section 5.1's protocol, sharded as :func:`sinai.evaluation.evaluate` shards it).
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, replace

import torch

from ..attacks.threat import ThreatModel
from ..defenses import DefendedModel, Defense, parse_defense
from ..evaluation.clean import clean_accuracy
from ..evaluation.config import EvalConfig
from ..evaluation.defaults import default_attack_args, default_eps
from ..evaluation.protocol import attack_shard
from ..evaluation.store import SCHEMA_VERSION, ResultStore, settings_key
from .plan import DefenseEntry, ModelEntry, Plan, import_modules

LABELS = ("method", "level")
"""Settings that only label a run: two runs that differ in them alone are one computation."""

CLEAN_SHARD = -1
"""The task that measures a run's clean accuracy (M noisy passes over its images)."""


def eval_config(
    plan: Plan,
    model: ModelEntry,
    defense: DefenseEntry,
    attack: str,
    dataset: str,
    resolved: Defense | None = None,
    network: str | None = None,
) -> EvalConfig:
    """The configuration ``sinai eval`` would build for this cell of the plan (``resolved``: the defense
    a calibrate/tune stage found, instead of the entry's text; ``network``: the model's variant the
    entry runs on, recorded as the run's ``network``)."""
    eps = plan_eps(plan, model, dataset)
    describe: dict[str, object] = {"model": model.name, "checkpoint": model.checkpoint, "dataset": dataset}
    if network is not None:
        describe["network"] = network
    if defense.method:
        describe["method"] = defense.method
        describe["level"] = defense.level or ""
    return EvalConfig(
        attack=attack,
        attack_args=default_attack_args(attack, dataset, plan.norm) | dict(plan.attack_args.get(attack, {})),
        defense=resolved if resolved is not None else parse_defense(defense.text),
        threat=ThreatModel(plan.norm, eps),
        budgets=plan.budgets,
        seed=plan.seed,
        shard_size=plan.shard_size,
        describe=describe,
        **plan.run,
    )


def plan_eps(plan: Plan, model: ModelEntry, dataset: str) -> float:
    return plan.eps if plan.eps is not None else default_eps(model.name, dataset, plan.norm)


@dataclass(frozen=True)
class SweepRun:
    """One run of a plan in the store: its id, label and number of tasks; ``source``: the run whose
    results it copies once they are done (the same configuration under another label, e.g. one tuned
    configuration chosen at both drops: attacked once)."""

    run_id: int
    label: str
    tasks: int
    source: int | None = None


def shard_count(settings: dict) -> int:
    """Attack shards of a run (0 for a clean-only run)."""
    if settings["attack"] == "none":
        return 0
    return math.ceil(int(settings["images"]) / int(settings["shard_size"]))


def expand(
    plan: Plan,
    store: ResultStore,
    *,
    device: torch.device | str = "cpu",
    cache_dir: str | None = None,
    stages: str | None = None,
    log=None,  # noqa: ANN001 - Callable[[str], None] | None
) -> list[SweepRun]:
    """Create the plan's runs and their tasks in ``store`` (existing ones are kept) and return them.

    Each model is loaded once here: a run's key holds the part of its defense that applies to the
    model (SINAI on a CNN is its ReLU part), as in :func:`~sinai.evaluation.evaluate`. With
    ``validation`` images, the evaluated images are disjoint from them, and the calibrate/tune stages
    run here first, on the validation images (their results kept in the store's meta; their working
    files under ``stages``, default the store's folder/stages): a run of a stage's defense is created
    only once the stage is done.
    """
    from ..models.data import load_dataset, select_images
    from ..models.zoo import default_dataset, load_model
    from .stages import run_stage, split_indices

    say = log or (lambda _msg: None)
    runs: list[SweepRun] = []
    variants: dict[str, torch.nn.Module] = {}
    seen: dict[str, int] = {}  # a run's settings but its labels -> its id
    for entry in plan.models:
        before = len(runs)
        say(f"{entry.name}: load or train")
        model = load_model(entry.name, checkpoint=entry.checkpoint, device=device, cache_dir=cache_dir)
        data = entry.data or default_dataset(entry.name, num_classes=model.num_classes)
        dataset = load_dataset(data, root=plan.data_root, image_size=model.input_shape[-1])
        validation = None
        if plan.validation:
            val, ev = split_indices(
                dataset.labels, plan.validation, plan.images, plan.seed, dataset.num_classes
            )
            indices, validation = ev.tolist(), (dataset, val)
        else:
            indices = select_images(dataset.labels, plan.images, plan.seed, dataset.num_classes).tolist()
        for defense in plan.defenses:
            resolved, network, target = None, None, model
            if defense.variant is not None:
                from ..models.embedded import VARIANTS

                network = VARIANTS[defense.variant].get(entry.name)
                if network is None or entry.checkpoint is not None:
                    say(
                        f"{entry.name}: no {defense.variant} variant for "
                        f"{defense.method or defense.text}; left out"
                    )
                    continue
                if network not in variants:
                    say(f"{entry.name}: load or train its {defense.variant} variant {network}")
                    variants[network] = load_model(network, device=device, cache_dir=cache_dir)
                target = variants[network]
            if defense.stage is not None:
                assert validation is not None  # parse_plan requires validation with stages
                resolved = run_stage(
                    plan, entry, defense, model, data, *validation, store=store, folder=stages,
                    device=device, log=say,
                )  # fmt: skip
                if resolved is None:
                    continue
            for attack in plan.attacks:
                config = eval_config(plan, entry, defense, attack, data, resolved, network)
                defended = DefendedModel(target, config.defense, seed=config.seed)
                try:
                    if defended.defense != config.defense:
                        config = replace(config, defense=defended.defense)
                finally:
                    defended.remove()
                settings = config.settings(images=len(indices), dataset_indices=indices)
                run_id = store.run_id(settings)
                shown = "none" if config.defense.name == "none" else config.defense.describe()
                label = f"{entry.name} | {defense.method or shown}"
                label += f" {defense.level}" if defense.level else ""
                same = json.dumps({k: v for k, v in settings.items() if k not in LABELS}, sort_keys=True)
                if same in seen:  # attacked once, under the first label; copied to this one when done
                    runs.append(SweepRun(run_id, f"{label} | {attack}", 0, source=seen[same]))
                    continue
                seen[same] = run_id
                shards = shard_count(settings)
                store.add_tasks([(run_id, CLEAN_SHARD), *((run_id, s) for s in range(shards))])
                runs.append(SweepRun(run_id, f"{label} | {attack}", shards + 1))
        say(f"{entry.name}: {len(runs) - before} runs of {len(indices)} {data} images")
    return runs


def config_from_settings(settings: dict) -> EvalConfig:
    """The ``EvalConfig`` whose settings are ``settings`` (checked: same key), for a worker."""
    if settings.get("schema") != SCHEMA_VERSION:
        raise ValueError(
            f"run settings of store schema {settings.get('schema')}; this sinai reads {SCHEMA_VERSION}"
        )
    fixed = set(EvalConfig()._fields(0, [])) | {"bpda", "vote_alpha", "vote_rate"}
    kwargs: dict[str, object] = {
        "attack": settings["attack"],
        "attack_args": settings["attack_args"],
        "defense": Defense.from_dict(settings["defense"]),
        "threat": ThreatModel(**settings["threat"]),
        "budgets": tuple(settings["budgets"]),
        "describe": {k: v for k, v in settings.items() if k not in fixed},
        "bpda": bool(settings.get("bpda", False)),
    }
    for name in (
        "seed",
        "passes",
        "eot",
        "votes",
        "lucky",
        "vote_rule",
        "confirm",
        "shard_size",
        "track_mismatch",
    ):
        kwargs[name] = settings[name]
    for name in ("vote_alpha", "vote_rate"):
        if name in settings:
            kwargs[name] = settings[name]
    config = EvalConfig(**kwargs)
    again = config.settings(images=settings["images"], dataset_indices=settings["dataset_indices"])
    if settings_key(again) != settings_key(settings):
        raise ValueError(
            "the stored run settings do not rebuild the same configuration (another sinai version?)"
        )
    return config


@dataclass(frozen=True)
class WorkerEnv:
    """What a worker needs besides the ledger: where models and data are on its machine, the device,
    the forward chunk size, the modules the plan imports, and how often it signals it is alive."""

    device: str = "auto"
    cache_dir: str | None = None
    data_root: str | None = None
    batch_size: int = 128
    imports: tuple[str, ...] = ()
    beat_seconds: float = 10.0
    threads: int = 1


class Worker:
    """Runs ledger tasks in one process, keeping models, images and configurations between tasks."""

    def __init__(self, location: str, env: WorkerEnv) -> None:
        from ..device import resolve_device

        import_modules(env.imports)
        self._threads = torch.get_num_threads()
        if env.threads:  # the same thread count everywhere: the same floating-point sums
            torch.set_num_threads(env.threads)
        self.location, self.env = location, env
        self.device = resolve_device(env.device)
        self.store = ResultStore(location)
        self._models: dict[tuple, torch.nn.Module] = {}
        self._runs: dict[int, tuple[EvalConfig, dict, torch.Tensor, torch.Tensor]] = {}

    def close(self) -> None:
        self.store.close()
        torch.set_num_threads(self._threads)

    def _model(self, settings: dict) -> torch.nn.Module:
        from ..models.zoo import load_model

        network = settings.get("network")  # a variant of the model (PGD-AT, MFDV-SNN, ...): no checkpoint
        key = (network, None) if network else (settings["model"], settings.get("checkpoint"))
        if key not in self._models:
            self._models[key] = load_model(
                key[0], checkpoint=key[1], device=self.device, cache_dir=self.env.cache_dir, progress=False
            )
        return self._models[key]

    def _run(self, run_id: int) -> tuple[EvalConfig, dict, torch.Tensor, torch.Tensor]:
        from ..models.data import load_dataset

        if run_id not in self._runs:
            settings = self.store.settings(run_id)
            config = config_from_settings(settings)
            model = self._model(settings)
            dataset = load_dataset(
                settings["dataset"], root=self.env.data_root, image_size=model.input_shape[-1]
            )
            indices = torch.tensor(settings["dataset_indices"], dtype=torch.long)
            self._runs[run_id] = (config, settings, dataset.load(indices), dataset.labels[indices].long())
        return self._runs[run_id]

    def run_task(self, run_id: int, shard: int, owner: str) -> str:
        """Do a claimed task and store it: "done", "lost" (another owner took it over) or "failed"."""
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(owner, stop), daemon=True)
        beat.start()
        try:
            self._run(run_id)  # model and images, loaded once per process: not the task's time
            start = time.perf_counter()
            results, clean = self._compute(run_id, shard)
        except Exception as err:  # a task's failure is recorded in the ledger; the worker goes on
            stop.set()
            self.store.fail(run_id, shard, owner, f"{type(err).__name__}: {err}".splitlines()[0])
            return "failed"
        finally:
            stop.set()
        seconds = time.perf_counter() - start
        written = self.store.complete(run_id, shard, owner, seconds=seconds, results=results, clean=clean)
        return "done" if written else "lost"

    def _compute(self, run_id: int, shard: int) -> tuple[list, list[float] | None]:
        config, settings, x, y = self._run(run_id)
        model = self._model(settings)
        defended = DefendedModel(model, config.defense, seed=config.seed)
        try:
            randomized = defended.defense.randomized or bool(getattr(model, "randomized", False))
            if shard == CLEAN_SHARD:
                passes = config.passes if randomized else 1
                acc = clean_accuracy(defended, x, y, passes=passes, batch_size=self.env.batch_size)
                return [], list(acc.per_pass)
            if shard < 0 or shard >= shard_count(settings):
                raise ValueError(f"run {run_id} has no shard {shard}")
            first = shard * config.shard_size
            stop = min(first + config.shard_size, len(x))
            indices = settings["dataset_indices"][first:stop]
            results = attack_shard(
                defended, config, shard, x[first:stop], y[first:stop], indices, first=first,
                randomized=randomized, batch_size=self.env.batch_size,
            )  # fmt: skip
            return results, None
        finally:
            defended.remove()

    def _beat(self, owner: str, stop: threading.Event) -> None:
        store = None
        try:
            while not stop.wait(self.env.beat_seconds):
                store = store or ResultStore(self.location)
                store.beat(owner)
        finally:
            if store is not None:
                store.close()
