"""Automatic tuning of SINAI: Optuna NSGA-II under a clean-accuracy-drop bound (SINAI section 4.3, App. B).

Decision variables are the noise ``std`` of every SINAI site kind the model has (attention logits,
pre-GeLU, pre-ReLU) and the injection ``ratio`` of the logit-selective kinds. Objectives: clean
accuracy (mean over M noisy passes) and robust accuracy under Square, both maximized. Constraint:
clean >= base - delta, handled by Optuna's own feasibility-first ``NSGAIISampler`` through
``trial.set_constraint`` (Optuna 5's successor of ``constraints_func``): infeasible trials rank by how
far they violate it.

Multi-fidelity, as in the paper: every trial is *screened* with a cheap Square run (few images, small
budget); afterwards the feasible trials on or near the screened Pareto front are *promoted* to the full
protocol (more images, the full budget). The chosen configuration for each delta is the promoted trial
with the best full-protocol robust accuracy among those whose drop is at most delta.

The study lives in an Optuna RDB storage (SQLite in the output folder by default) and every robust
evaluation in a sinai result store, so a killed run resumes faithfully:

- finished trials and evaluations are reused;
- a trial cut mid-way (``kill -9``, ctrl-C, a lost machine) is marked FAIL and its parameters are queued
  again with Optuna's ``RetryHeartbeatStaleTrialCallback``: at once when its process is gone from this
  host (:func:`recover_interrupted`), after the heartbeat's grace period for a worker elsewhere;
- the sampler keeps no state between trials that a restart could lose: every trial's random draws come
  from a seed derived from ``(seed, the trial's place in the study)`` (:class:`TrialSeededNSGAII`), so no
  parameters repeat after a restart and a killed-and-resumed study makes the same trials, and the same
  choice, as one that ran through.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks.threat import ThreatModel
from ..defenses import Defense, NoiseSpec, find_sites, protect
from ..defenses.spec import SELECTIVE_KINDS
from ..evaluation.clean import clean_accuracy
from ..evaluation.config import EvalConfig
from ..evaluation.protocol import evaluate
from ..evaluation.store import ResultStore
from ..models.data import select_images
from .pareto import pareto_front

TUNED_KINDS = ("attn", "gelu", "relu")
DEFAULT_THREAT = ThreatModel("linf", 0.1)

# SINAI Appendix B: std ranges up to where clean accuracy starts to fall on ViT-B / ResNet-50, ratio in
# [0, 1]. The attention range is the ViT's; the ReLU range the ResNet's.
PAPER_RANGES: Mapping[str, tuple[float, float]] = {
    "attn.std": (0.0, 2.0),
    "gelu.std": (0.0, 0.4),
    "gelu.ratio": (0.0, 1.0),
    "relu.std": (0.0, 0.4),
    "relu.ratio": (0.0, 1.0),
}
# The embedded MNIST models, by the same rule (README, "Embedded models"): the ViT loses ~1.4% at attn
# std 0.5 and ~10% at gelu std 0.8 (ratio 0.7); the CNN ~1% at relu std 0.4 and ~20% at 0.8 (ratio 0.5).
EMBEDDED_RANGES: Mapping[str, Mapping[str, tuple[float, float]]] = {
    "mnist-vit": {"attn.std": (0.0, 1.0), "gelu.std": (0.0, 0.8), "gelu.ratio": (0.0, 1.0)},
    "mnist-cnn": {"relu.std": (0.0, 0.8), "relu.ratio": (0.0, 1.0)},
}


@dataclass(frozen=True)
class Fidelity:
    """How a robust accuracy is measured: Square on ``images`` images with ``budget`` queries."""

    images: int
    budget: int

    def __post_init__(self) -> None:
        if self.images < 1 or self.budget < 1:
            raise ValueError(f"a fidelity needs images >= 1 and budget >= 1, got {self}")


@dataclass(frozen=True)
class TrialResult:
    """One configuration: its screened and (when promoted) full-protocol robust accuracy."""

    number: int
    params: Mapping[str, float]
    clean: float
    robust: float  # NaN when not screened (infeasible trials cost no attack)
    drop: float
    robust_full: float | None = None

    def defense(self) -> Defense:
        return defense_from_params(self.params)

    def as_dict(self) -> dict[str, object]:
        return {
            "number": self.number,
            "params": dict(self.params),
            "defense": self.defense().describe(),
            "clean": self.clean,
            "drop": self.drop,
            "robust": self.robust,
            "robust_full": self.robust_full,
        }


@dataclass(frozen=True)
class TuneResult:
    """Every finished trial, the feasible screened Pareto front, and the choice for each delta."""

    base: float
    deltas: tuple[float, ...]
    trials: tuple[TrialResult, ...]
    pareto: tuple[TrialResult, ...]
    chosen: Mapping[float, TrialResult | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "base": self.base,
            "deltas": list(self.deltas),
            "trials": [t.as_dict() for t in self.trials],
            "pareto": [t.number for t in self.pareto],
            "chosen": {f"{d:g}": (t.as_dict() if t else None) for d, t in self.chosen.items()},
        }

    @property
    def unmet(self) -> tuple[float, ...]:
        """The deltas no trial met (no feasible configuration within them), smallest first."""
        return tuple(d for d in self.deltas if self.chosen.get(d) is None)


def no_feasible_text(delta: float) -> str:
    """What the tuning table, the report tables and the plots say for a delta no trial met."""
    return f"no feasible configuration within δ = {100 * delta:g}%"


# ------------------------------------------------------------------------------------ search space
def parse_ranges(text: str) -> dict[str, tuple[float, float]]:
    """``"attn.std=0:1,gelu.ratio=0.2:1"`` -> ``{"attn.std": (0.0, 1.0), "gelu.ratio": (0.2, 1.0)}``."""
    ranges: dict[str, tuple[float, float]] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, eq, span = item.partition("=")
        low, colon, high = span.partition(":")
        try:
            if not eq or not colon:
                raise ValueError
            ranges[name.strip()] = (float(low), float(high))
        except ValueError:
            raise ValueError(f"expected kind.field=low:high such as attn.std=0:1, got {item!r}") from None
    return ranges


def check_space(space: Mapping[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """Validate names (``attn|gelu|relu`` . ``std|ratio``) and bounds; return a plain sorted dict."""
    if not space:
        raise ValueError("the search space is empty: the model has none of the attn/gelu/relu sites")
    checked = {}
    for name, (low, high) in sorted(space.items()):
        kind, _, field_ = name.partition(".")
        if kind not in TUNED_KINDS or field_ not in ("std", "ratio"):
            raise ValueError(
                f"unknown decision variable {name!r}; use attn.std, gelu.std/ratio, relu.std/ratio"
            )
        if field_ == "ratio" and kind not in SELECTIVE_KINDS:
            raise ValueError(f"{name}: only {SELECTIVE_KINDS} sites have a ratio")
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"search range of {name} must have low <= high, got [{low}, {high}]")
        if low < 0 or (field_ == "ratio" and high > 1):
            raise ValueError(
                f"search range of {name} must lie in {'[0, 1]' if field_ == 'ratio' else '[0, inf)'}"
            )
        checked[name] = (float(low), float(high))
    return checked


def search_space(
    model: nn.Module,
    model_name: str | None = None,
    overrides: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, tuple[float, float]]:
    """The decision variables that exist in ``model``, with the paper's (or the embedded) ranges.

    ``overrides`` replace or add ranges; a variable of a kind the model lacks is an error.
    """
    found = find_sites(model, {kind: NoiseSpec(std=0.0) for kind in TUNED_KINDS})
    kinds = {kind for kind, sites in found.items() if sites}
    defaults = EMBEDDED_RANGES.get(model_name or "", PAPER_RANGES)
    space = {name: span for name, span in defaults.items() if name.partition(".")[0] in kinds}
    for name, span in (overrides or {}).items():
        if name.partition(".")[0] not in kinds:
            raise ValueError(
                f"{name}: this model has no {name.partition('.')[0]} sites (it has {sorted(kinds)})"
            )
        space[name] = span
    return check_space(space)


def defense_from_params(params: Mapping[str, float]) -> Defense:
    """A SINAI defense from decision-variable values (a kind's ratio defaults to 1 when not tuned)."""
    kinds: dict[str, dict[str, float]] = {}
    for name, value in params.items():
        kind, _, field_ = name.partition(".")
        kinds.setdefault(kind, {})[field_] = float(value)
    specs = {
        kind: NoiseSpec(std=f.get("std", 0.0), ratio=f.get("ratio", 1.0)) for kind, f in sorted(kinds.items())
    }
    return Defense(specs, name="SINAI", require="any")


# ---------------------------------------------------------------------------------------- resuming
WORKER_ATTR = "sinai:worker"
"""User attribute of a trial: ``host:pid:start`` of the process that runs it (see :func:`worker_alive`)."""
INTERRUPTED_ATTR = "sinai:interrupted"
"""User attribute of a trial stopped by ctrl-C: failed by Optuna, retried on the next run."""
MAX_RETRY = 3
"""How many times the parameters of a trial cut short are asked again (a trial that kills its process
every time, e.g. out of memory, is not retried forever)."""


def _started(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), "" when unknown."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else ""


def _proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (state first); [] without ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses


def this_worker() -> str:
    """``host:pid:start`` of this process: what :func:`worker_alive` checks on another run."""
    return f"{socket.gethostname()}:{os.getpid()}:{_started(os.getpid())}"


def worker_alive(worker: object) -> bool | None:
    """Whether the process ``worker`` (a :func:`this_worker` text) still runs: True/False on this host,
    None when that cannot be told here (no worker recorded, another host, Windows)."""
    if not isinstance(worker, str) or worker.count(":") < 2 or os.name == "nt":
        return None  # os.kill on Windows would terminate the process, not probe it
    host, pid_text, started = worker.rsplit(":", 2)
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, run by another user
    if _proc_stat(pid)[:1] in (["Z"], ["X"]):  # killed, not yet reaped by its parent: gone all the same
        return False
    return not started or _started(pid) in ("", started)  # another process that reuses the pid: gone


def _retry_history(trial: optuna.trial.FrozenTrial) -> list[int]:
    with warnings.catch_warnings():  # experimental in Optuna since 3.0, stable in use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)


def _retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)


def trial_key(trials: Sequence[optuna.trial.FrozenTrial], trial: optuna.trial.FrozenTrial) -> int:
    """The place of ``trial`` in a study that never stopped: its number less the retries before it; a
    retry takes the place of the trial it repeats. Seeds :class:`TrialSeededNSGAII`'s draws."""
    history = _retry_history(trial)
    first = history[0] if history else trial.number
    return first - sum(1 for t in trials if t.number < first and _retry_history(t))


def trial_seed(seed: int, key: int) -> int:
    """A 32-bit seed for the trial at place ``key`` of a study seeded ``seed`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([seed & (2**64 - 1), key]).generate_state(1)[0])


class TrialSeededNSGAII(optuna.samplers.BaseSampler):
    """Optuna's ``NSGAIISampler`` whose random draws for each trial come from
    ``trial_seed(seed, trial_key(...))`` instead of one stream that lives in the process.

    NSGA-II's other state (generations, parent populations, constraints) is kept in the study by Optuna;
    its random stream is not, so a seeded sampler built again after a restart would propose trial 0's
    parameters again (Optuna's resuming tutorial restores a pickled sampler instead, which still
    diverges when the process dies mid-trial). Seeding each trial by its place makes the proposals a
    function of the seed and the study's history alone: nothing to lose on ``kill -9``.
    """

    def __init__(self, *, population_size: int, seed: int) -> None:
        self.population_size = population_size
        self.seed = seed
        self._inner = self._nsga(0)

    def _nsga(self, key: int) -> optuna.samplers.NSGAIISampler:
        return optuna.samplers.NSGAIISampler(
            population_size=self.population_size, seed=trial_seed(self.seed, key)
        )

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._nsga(trial_key(study.get_trials(deepcopy=False), trial))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):  # noqa: ANN001, ANN201 - BaseSampler's signature
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):  # noqa: ANN001, ANN201
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):  # noqa: ANN001, ANN201
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001
        self._inner.after_trial(study, trial, state, values)


def recover_interrupted(
    study: optuna.Study, *, exclusive: bool, log: Callable[[str], None] | None = None
) -> list[int]:
    """Fail the trials cut short and queue their parameters again; return the numbers queued.

    A RUNNING trial is cut short when the process that ran it is gone from this host (``kill -9``), or,
    with an ``exclusive`` storage (one writer: SQLite), whenever its process is not known to run. A
    FAILed trial is queued again when ctrl-C stopped it. Each is queued once (a trial already retried is
    skipped), at most :data:`MAX_RETRY` times along a chain of retries, with Optuna's
    ``RetryHeartbeatStaleTrialCallback``: the retry keeps the trial's parameters, NSGA-II generation
    and place (:func:`trial_key`). A RUNNING trial of another host is left to the RDB heartbeat (a
    journal storage has none: such a trial stays RUNNING).
    """
    say = log or (lambda _msg: None)
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        alive = worker_alive(t.user_attrs.get(WORKER_ATTR))
        if alive or (alive is None and not exclusive):
            continue  # running, or elsewhere: Optuna's heartbeat fails it once it goes quiet
        study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        failed.append(t.number)
    trials = study.get_trials(deepcopy=True)
    retried = {n for t in trials for n in _retry_history(t)}
    queued = []
    retry = _retry_callback()
    for t in trials:
        interrupted = t.number in failed or t.user_attrs.get(INTERRUPTED_ATTR)
        if t.state != optuna.trial.TrialState.FAIL or not interrupted or t.number in retried:
            continue
        before = len(study.get_trials(deepcopy=False))
        retry(study, t)
        if len(study.get_trials(deepcopy=False)) > before:
            queued.append(t.number)
            say(f"trial {t.number} was cut short: marked failed, its parameters are asked again")
        else:
            say(f"trial {t.number} was cut short {MAX_RETRY + 1} times: not retried")
    return queued


# ------------------------------------------------------------------------------------------ tuning
JOURNAL = "journal:"
"""``journal:FILE``: Optuna's journal file storage (append-only; for parallel workers on NFS)."""


def parallel_storage(storage: str) -> bool:
    """Whether several trial workers may share ``storage`` (PostgreSQL/MySQL or a journal file; SQLite
    breaks under parallel writers)."""
    return storage.startswith((JOURNAL, "postgresql", "mysql"))


def _trial_worker(payload: bytes, kwargs: dict) -> None:
    """A spawned trial worker: the same study, trials only (the parent promotes and chooses).

    ``payload`` is the model, images and labels saved with ``torch.save``: passed as plain bytes, not as
    tensors, whose pickling by ``torch.multiprocessing`` hands file descriptors to the child (which
    fails when the parent's descriptors are in use elsewhere, e.g. under a test runner)."""
    torch.set_num_threads(1)
    model, images, labels = torch.load(io.BytesIO(payload), weights_only=False)
    location = kwargs.pop("store_location")
    try:
        with ResultStore(location) as store:
            tune(model, images, labels, store=store, progress=False, trials_only=True, **kwargs)
    except KeyboardInterrupt:  # ctrl-C reaches every process: the parent says it once
        raise SystemExit(130) from None


def open_study(
    storage: str, study_name: str, config: Mapping[str, object], sampler: optuna.samplers.BaseSampler
) -> optuna.Study:
    """Create or load the study; refuse one stored with another search space or objective setting."""
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna, stable since 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if storage.startswith(JOURNAL):  # one append-only file, safe on NFS for many workers
                backend = optuna.storages.journal.JournalFileBackend(storage[len(JOURNAL) :])
                rdb = optuna.storages.JournalStorage(backend)
            else:
                engine = {"connect_args": {"connect_timeout": 10}} if storage.startswith("postgresql") else {}
                rdb = optuna.storages.RDBStorage(
                    storage, heartbeat_interval=30, grace_period=90, engine_kwargs=engine,
                    heartbeat_stale_trial_callback=_retry_callback(),
                )  # fmt: skip
    except Exception as exc:  # SQLAlchemy / Optuna raise many kinds for a bad URL or unwritable file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot open Optuna storage {storage!r}: {reason}") from None
    study = optuna.create_study(
        storage=rdb,
        study_name=study_name,
        sampler=sampler,
        directions=["maximize", "maximize"],
        load_if_exists=True,
    )
    stored = study.user_attrs.get("config")
    wanted = json.loads(json.dumps(config))
    if stored is None:
        study.set_user_attr("config", wanted)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["clean", "robust"])
        return study
    if set(wanted) - set(stored):  # a study made by an older sinai: the settings it did not record
        stored = {**wanted, **stored}
        study.set_user_attr("config", stored)
    if stored != wanted:
        differ = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise ValueError(
            f"study {study_name!r} in {storage} was made with other settings ({', '.join(differ)}: "
            f"{ {k: stored.get(k) for k in differ} }); use another study name (--study-name) or the same "
            "settings"
        )
    return study


def tune(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    deltas: Sequence[float] = (0.01,),
    space: Mapping[str, tuple[float, float]] | None = None,
    model_name: str | None = None,
    trials: int = 40,
    population: int = 10,
    passes: int = 3,
    screen: Fidelity = Fidelity(images=50, budget=200),
    full: Fidelity = Fidelity(images=100, budget=1000),
    promote: int = 2,
    threat: ThreatModel = DEFAULT_THREAT,
    attack_kwargs: Mapping[str, object] | None = None,
    storage: str = "sqlite:///study.sqlite",
    study_name: str = "sinai",
    store: ResultStore | None = None,
    seed: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    workers: int = 1,
    trials_only: bool = False,
    sampler_seed: int | None = None,
) -> TuneResult | None:
    """Tune SINAI's decision variables on ``images`` (a validation set); see the module docstring.

    Clean accuracy uses all ``images``; robust accuracy seeded class-covering subsets of them
    (``screen`` for every trial, ``full`` for promoted ones). The constraint uses the largest delta;
    each delta gets its own choice. ``promote``: besides the feasible Pareto front, the best ``promote``
    screened trials under each delta are re-evaluated with the full protocol.

    ``workers`` > 1: that many trial workers on the one study (this process and ``workers - 1`` spawned
    ones, one torch thread each), which needs a ``storage`` that takes parallel writers (PostgreSQL or
    ``journal:FILE``); the trials stop at ``trials`` complete ones in all, and this process promotes and
    chooses once every worker is done. ``trials_only``: run trials, return None (a spawned worker).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and not parallel_storage(storage):
        raise ValueError(
            f"{workers} trial workers need a storage that takes parallel writers: postgresql://... or "
            f"journal:FILE, not {storage!r}"
        )
    deltas = tuple(sorted(float(d) for d in deltas))
    if not deltas or not all(0 < d < 1 for d in deltas):
        raise ValueError(f"delta must be a fraction in (0, 1) such as 0.01 for 1%, got {deltas}")
    if trials < 1 or population < 2 or passes < 1 or promote < 0:
        raise ValueError("need trials >= 1, population >= 2, passes >= 1 and promote >= 0")
    labels = torch.as_tensor(labels).long()
    num_classes = getattr(model, "num_classes", None)
    for what, fid in (("screen", screen), ("full", full)):
        if fid.images > len(images):
            raise ValueError(
                f"a fidelity asks for {fid.images} images but the validation set has {len(images)}"
            )
        if fid.images < len(images):  # the class-covering subset must exist before any trial runs
            try:
                select_images(labels.cpu(), fid.images, seed, num_classes)
            except ValueError as err:
                raise ValueError(f"the {what} fidelity ({fid.images} images): {err}") from None
    space = check_space(space) if space is not None else search_space(model, model_name)
    store = store or ResultStore(":memory:")
    say = log or (lambda _msg: None)
    base = clean_accuracy(model, images, labels, passes=1, batch_size=batch_size).mean
    bound = base - deltas[-1]

    def subset(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n == len(images):
            return images, labels
        idx = select_images(labels, n, seed, num_classes)
        return images[idx], labels[idx]

    def robust(defense: Defense, fid: Fidelity, stage: str) -> float:
        x, y = subset(fid.images)
        config = EvalConfig(
            attack="square",
            attack_args=attack_kwargs or {},
            defense=defense,
            threat=threat,
            budgets=(fid.budget,),
            seed=seed,
            passes=passes,
            describe={"model": model_name, "stage": stage},
        )
        result = evaluate(model, x, y, config, store=store, batch_size=batch_size, progress=False)
        return result.robust_accuracy(fid.budget)

    def measure(trial: optuna.Trial) -> tuple[float, float]:
        params = {name: trial.suggest_float(name, low, high) for name, (low, high) in space.items()}
        defense = defense_from_params(params)
        defended = protect(model, defense, seed=seed)
        try:
            clean = clean_accuracy(defended, images, labels, passes=passes, batch_size=batch_size).mean
        finally:
            defended.remove()
        with warnings.catch_warnings():  # a retry carries the constraint its cut-short trial set
            warnings.filterwarnings("ignore", message="The constraint value is ignored")
            trial.set_constraint("clean_drop", bound - clean)  # > 0: violated (Optuna's convention)
        # Infeasible trials are ranked by their violation alone: no attack is spent on them.
        trial.set_user_attr("screened", clean >= bound)
        return clean, robust(defense, screen, "screen") if clean >= bound else 0.0

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.set_user_attr(WORKER_ATTR, this_worker())  # a later run fails the trial if this process dies
        if trial.user_attrs.get(INTERRUPTED_ATTR):  # a retry: the mark was its cut-short trial's
            trial.set_user_attr(INTERRUPTED_ATTR, False)
        try:
            return measure(trial)
        except KeyboardInterrupt:  # Optuna fails the trial; the next run asks its parameters again
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            raise

    config = {
        "model": model_name,
        "space": {k: list(v) for k, v in space.items()},
        "delta": deltas[-1],
        "screen": [screen.images, screen.budget],
        "images": len(images),
        "passes": passes,
        "population": population,
        "norm": threat.norm,
        "eps": threat.eps,
        "seed": seed,
    }
    sampler = TrialSeededNSGAII(
        population_size=population, seed=seed if sampler_seed is None else sampler_seed
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(storage, study_name, config, sampler)
    recover_interrupted(study, exclusive=not parallel_storage(storage), log=say)
    complete = lambda: study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    done = len(complete())
    if done:
        say(f"study {study_name!r}: {done} of {trials} trials already done, resuming")
    bar = tqdm(total=trials, initial=min(done, trials), unit="trial", desc="tune", disable=not progress)

    def tick(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            bar.update(1)
            feasible = [t.values[1] for t in complete() if t.values[0] >= bound]
            bar.set_postfix(best_robust=f"{100 * max(feasible):.1f}%" if feasible else "-", refresh=False)

    helpers = []
    if done < trials and workers > 1:
        import multiprocessing

        location = getattr(store, "url", None) or str(store.path)
        shared = dict(
            deltas=deltas, space=space, model_name=model_name, trials=trials, population=population,
            passes=passes, screen=screen, full=full, promote=promote, threat=threat,
            attack_kwargs=dict(attack_kwargs or {}), storage=storage, study_name=study_name, seed=seed,
            batch_size=batch_size, store_location=location,
        )  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        buffer = io.BytesIO()
        torch.save((model, images.cpu(), labels.cpu()), buffer)
        helpers = [  # each its own sampler stream: the same seed would propose the same first trials
            ctx.Process(
                target=_trial_worker,
                args=(buffer.getvalue(), {**shared, "sampler_seed": seed + 1000 * (i + 1)}),
            )
            for i in range(workers - 1)
        ]
        for proc in helpers:
            proc.start()
    if done < trials:
        stop = optuna.study.MaxTrialsCallback(trials, states=(optuna.trial.TrialState.COMPLETE,))
        study.optimize(objective, n_trials=trials - done, callbacks=[tick, stop])
    for proc in helpers:
        proc.join()
        if proc.exitcode != 0:
            say(f"trial worker {proc.pid} ended with exit code {proc.exitcode}")
    bar.close()
    if trials_only:
        return None

    results = [
        TrialResult(
            t.number,
            dict(t.params),
            t.values[0],
            t.values[1] if t.user_attrs.get("screened") else math.nan,
            base - t.values[0],
        )
        for t in complete()[:trials]
    ]
    feasible = [r for r in results if r.clean >= bound]
    pareto = sorted(pareto_front(feasible, key=lambda r: (r.clean, r.robust)), key=lambda r: r.clean)
    promoted = {r.number for r in pareto}
    for d in deltas:
        under = sorted((r for r in feasible if r.drop <= d), key=lambda r: (-r.robust, -r.clean))
        promoted |= {r.number for r in under[:promote]}
    say(f"full protocol ({full.images} images, {full.budget} queries) for {len(promoted)} promoted trials")
    for r in tqdm(results, desc="promote", disable=not progress, leave=False):
        if r.number in promoted:
            results[results.index(r)] = TrialResult(
                r.number, r.params, r.clean, r.robust, r.drop, robust(r.defense(), full, "full")
            )
    by_number = {r.number: r for r in results}
    pareto = [by_number[r.number] for r in pareto]
    chosen: dict[float, TrialResult | None] = {}
    for d in deltas:
        under = [r for r in results if r.robust_full is not None and r.drop <= d]
        chosen[d] = max(under, key=lambda r: (r.robust_full, r.clean)) if under else None
    return TuneResult(base, deltas, tuple(results), tuple(pareto), chosen)
