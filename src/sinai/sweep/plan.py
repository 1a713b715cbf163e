"""A sweep plan (``PLAN.toml``): models x defenses x attacks at given budgets on N images, as TOML.

Every key is checked where it enters; a wrong key, attack, model or defense is a ``ValueError`` that
names the plan's line and the valid values. ``expand`` turns the plan into runs, each with the exact
``EvalConfig`` that ``sinai eval`` would use, so a sweep's runs are ordinary runs of the result store.

    name = "mnist-small"                 # default: the file's stem
    models = ["mnist-cnn", "mnist-vit"]  # or {name = "timm:resnet50", checkpoint = "w.pth", data = "cifar10"}
    defenses = ["none", "RND:std=0.05", {defense = "FND:std=0.5", method = "FND", level = "≈1%"},
                {defense = "none", method = "PGD-AT", variant = "adv"},  # on each model's PGD-AT network
                {calibrate = "FND", drop = [0.01, 0.02]},    # stages: found on the validation images
                {tune = "SINAI", delta = 0.01, trials = 20}]
    validation = 200                     # validation images (stages), disjoint from the evaluated ones
    attacks = ["square", "signhunter"]
    budgets = [100, 1000]                # robust accuracy at each; one attack with the largest
    images = 100                         # N seeded class-covering images per model
    shard_size = 25                      # images per task
    seed = 0
    norm = "linf"                        # eps: default per dataset and model
    [attack_args.square]
    p_init = 0.05
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomllib  # Python >= 3.11

from ..attacks import ATTACKS
from ..attacks.threat import NORMS

RUN_KEYS = {
    "passes": int,
    "eot": int,
    "votes": int,
    "lucky": bool,
    "vote_rule": str,
    "vote_alpha": float,
    "vote_rate": float,
    "confirm": int,
    "track_mismatch": bool,
}
"""EvalConfig fields a plan may set for all its runs (their meaning: ``sinai eval --help``)."""

KEYS = {
    "name": str,
    "out": str,
    "store": str,
    "models": list,
    "defenses": list,
    "attacks": list,
    "budgets": list,
    "images": int,
    "validation": int,
    "shard_size": int,
    "seed": int,
    "norm": str,
    "eps": float,
    "batch_size": int,
    "data_root": str,
    "imports": list,
    "attack_args": dict,
    **RUN_KEYS,
}
"""Every key a plan may have, with its TOML type."""

MODEL_KEYS = ("name", "checkpoint", "data")
DEFENSE_KEYS = ("defense", "method", "level", "variant")
CALIBRATE_KEYS = ("calibrate", "drop", "method", "level")
TUNE_KEYS = ("tune", "delta", "trials", "population", "screen", "full", "method", "level")
TUNED_PRESETS = ("SINAI",)
"""What a ``tune`` stage tunes (Optuna NSGA-II over SINAI's site stds and ratios, SINAI section 4.3)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    checkpoint: str | None = None
    data: str | None = None


@dataclass(frozen=True)
class Stage:
    """A defense found on the plan's validation images before its runs are expanded (RFD section 4.1,
    SINAI sections 4.3 and 5.1): ``calibrate`` bisects the std of a one-kind preset to each clean-accuracy
    ``drops``; ``tune`` runs Optuna NSGA-II on SINAI under the largest of ``drops`` and chooses the best
    configuration at each (one study for all of them)."""

    kind: str  # "calibrate" | "tune"
    preset: str
    drops: tuple[float, ...]
    trials: int = 20
    population: int = 4
    screen: tuple[int, int] | None = None  # (images, budget) of every trial; default (<=50, 200)
    full: tuple[int, int] | None = None  # of the promoted trials; default (<=100, the largest budget)


@dataclass(frozen=True)
class DefenseEntry:
    """A defense of the plan: ``text`` (fixed), or the preset of a ``stage`` at one of its ``drop``s.
    ``variant`` (a kind of :data:`sinai.models.embedded.VARIANTS`: adv, mfdv, selective, surrogate) applies
    the defense to each model's trained variant instead of the model itself (PGD-AT, MFDV-SNN and
    SINAI-selective rows); a model without that variant has no such run."""

    text: str
    method: str | None = None
    level: str | None = None
    stage: Stage | None = None
    drop: float | None = None
    variant: str | None = None


@dataclass(frozen=True)
class Plan:
    """A parsed plan (see the module docstring); ``source`` is the file it came from."""

    name: str
    models: tuple[ModelEntry, ...]
    defenses: tuple[DefenseEntry, ...]
    attacks: tuple[str, ...]
    budgets: tuple[int, ...]
    images: int
    validation: int | None = None
    shard_size: int = 100
    seed: int = 0
    norm: str = "linf"
    eps: float | None = None
    batch_size: int = 128
    out: str | None = None
    store: str | None = None
    data_root: str | None = None
    imports: tuple[str, ...] = ()
    attack_args: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    run: Mapping[str, object] = field(default_factory=dict)
    source: str = "<plan>"

    @property
    def size(self) -> int:
        """Runs in the plan."""
        return len(self.models) * len(self.defenses) * len(self.attacks)

    def default_store(self) -> str:
        """The plan's store: its ``store``, else ``OUT/results.sqlite`` (OUT: ``out`` or runs/sweep/NAME)."""
        return self.store or str(Path(self.out or f"runs/sweep/{self.name}") / "results.sqlite")


class _Lines:
    """Finds the line of a key or a value in the plan's text, for error messages."""

    def __init__(self, text: str, source: str) -> None:
        self.lines, self.source = text.splitlines(), source

    def of_key(self, key: str) -> int | None:
        pattern = re.compile(rf"^\s*(\[+\s*)?([\w.\"-]*\.)?\"?{re.escape(key)}\"?\s*(=|\]|\.)")
        return next((i for i, line in enumerate(self.lines, 1) if pattern.search(line)), None)

    def of_value(self, value: str, after: str | None = None) -> int | None:
        start = (self.of_key(after) or 1) if after else 1
        for i, line in enumerate(self.lines[start - 1 :], start):
            if f'"{value}"' in line or f"'{value}'" in line:
                return i
        return self.of_key(after) if after else None

    def error(self, line: int | None, message: str) -> ValueError:
        where = f"{self.source} line {line}" if line else self.source
        return ValueError(f"{where}: {message}")


def load_plan(path: str | Path) -> Plan:
    """Read and check ``PLAN.toml`` (see :func:`parse_plan`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan {path} does not exist")
    return parse_plan(path.read_text(), source=str(path), name=path.stem)


def parse_plan(text: str, *, source: str = "<plan>", name: str = "sweep") -> Plan:
    """Parse and check a plan's TOML text; errors name the line and the valid values."""
    lines = _Lines(text, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source}: not valid TOML: {err}") from None
    for key, value in data.items():
        if key not in KEYS:
            raise lines.error(
                lines.of_key(key), f"unknown key {key!r}; valid keys: {', '.join(sorted(KEYS))}"
            )
        want = KEYS[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise lines.error(
                lines.of_key(key), f"{key} must be a {want.__name__}, got {type(value).__name__} {value!r}"
            )
    for key in ("models", "defenses", "attacks", "budgets", "images"):
        if key not in data:
            raise ValueError(
                f"{source}: the plan needs {key!r} (keys: models, defenses, attacks, budgets, images)"
            )
    imports = tuple(_strings(data.get("imports", []), "imports", lines))
    import_modules(imports)

    from ..models.zoo import default_dataset, list_models

    models = []
    for item in data["models"]:
        entry = _table(item, "name", MODEL_KEYS, "models", lines)
        model = ModelEntry(entry["name"], entry.get("checkpoint"), entry.get("data"))
        try:
            default_dataset(model.name)
        except ValueError:
            raise lines.error(
                lines.of_value(model.name, "models"),
                f"unknown model {model.name!r}; valid models: {', '.join(list_models())}",
            ) from None
        models.append(model)

    from ..defenses import parse_defense

    defenses = []
    for item in data["defenses"]:
        if isinstance(item, dict) and ("calibrate" in item or "tune" in item):
            defenses += _stage_entries(item, data, lines)
            continue
        entry = _table(item, "defense", DEFENSE_KEYS, "defenses", lines)
        try:
            parse_defense(entry["defense"])
        except ValueError as err:
            raise lines.error(lines.of_value(entry["defense"], "defenses"), str(err)) from None
        variant = entry.get("variant")
        if variant is not None:
            from ..models.embedded import VARIANTS

            if variant not in VARIANTS:
                raise lines.error(
                    lines.of_value(variant, "defenses"),
                    f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}",
                )
        defenses.append(
            DefenseEntry(entry["defense"], entry.get("method"), entry.get("level"), variant=variant)
        )

    attacks = []
    for attack in _strings(data["attacks"], "attacks", lines):
        if attack.lower() not in ATTACKS:
            raise lines.error(
                lines.of_value(attack, "attacks"),
                f"unknown attack {attack!r}; valid attacks: {', '.join(ATTACKS)}",
            )
        attacks.append(attack.lower())
    attack_args: dict[str, dict[str, object]] = {}
    for attack, args in data.get("attack_args", {}).items():
        if attack not in attacks or not isinstance(args, dict):
            raise lines.error(
                lines.of_key(attack),
                f"[attack_args.{attack}] must be a table of keyword arguments of an attack of the plan "
                f"({', '.join(attacks)})",
            )
        attack_args[attack] = dict(args)

    budgets = data["budgets"]
    if not budgets or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in budgets):
        raise lines.error(lines.of_key("budgets"), f"budgets must be positive integers, got {budgets!r}")
    for key in ("images", "validation", "shard_size", "batch_size"):
        if key in data and data[key] < 1:
            raise lines.error(lines.of_key(key), f"{key} must be at least 1, got {data[key]}")
    if data.get("seed", 0) < 0:
        raise lines.error(lines.of_key("seed"), f"seed must be >= 0, got {data['seed']}")
    norm = data.get("norm", "linf")
    if norm not in NORMS:
        raise lines.error(lines.of_key("norm"), f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    for what in ("models", "defenses", "attacks"):
        if not data[what]:
            raise lines.error(lines.of_key(what), f"{what} is empty")
    plan = Plan(
        name=data.get("name", name),
        models=tuple(models),
        defenses=tuple(defenses),
        attacks=tuple(attacks),
        budgets=tuple(sorted(set(budgets))),
        images=data["images"],
        validation=data.get("validation"),
        shard_size=data.get("shard_size", 100),
        seed=data.get("seed", 0),
        norm=norm,
        eps=float(data["eps"]) if "eps" in data else None,
        batch_size=data.get("batch_size", 128),
        out=data.get("out"),
        store=data.get("store"),
        data_root=data.get("data_root"),
        imports=imports,
        attack_args=attack_args,
        run={k: data[k] for k in RUN_KEYS if k in data},
        source=source,
    )
    # Every run's configuration is built once here, so a bad attack argument or a wrong combination
    # fails before any work starts, with the line of the attack.
    from .runs import eval_config

    first = plan.models[0]
    for attack in plan.attacks:
        try:
            eval_config(plan, first, plan.defenses[0], attack, first.data or default_dataset(first.name))
        except (ValueError, TypeError) as err:
            raise lines.error(lines.of_key(attack) or lines.of_value(attack, "attacks"), str(err)) from None
    return plan


def import_modules(names: Sequence[str]) -> None:
    """Import the plan's ``imports`` (modules that register models, attacks or defenses)."""
    for module in names:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"cannot import {module!r} (plan imports): {err}") from None


def _strings(value: object, key: str, lines: _Lines) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise lines.error(lines.of_key(key), f"{key} must be a list of strings, got {value!r}")
    return list(value)


def _table(item: object, main: str, keys: Sequence[str], what: str, lines: _Lines) -> dict[str, str]:
    """A list item: a string (its ``main`` field) or an inline table with ``keys``."""
    if isinstance(item, str):
        return {main: item}
    if isinstance(item, dict):
        unknown = sorted(set(item) - set(keys))
        if unknown or main not in item or not all(isinstance(v, str) for v in item.values()):
            line = lines.of_value(str(item.get(main, "")), what) if main in item else lines.of_key(what)
            raise lines.error(
                line,
                f"a {what} entry is a string or a table of strings with keys {', '.join(keys)} "
                f"({main!r} required), got {item!r}",
            )
        return dict(item)
    raise lines.error(lines.of_key(what), f"a {what} entry is a string or a table, got {item!r}")


def _stage_entries(item: dict, data: dict, lines: _Lines) -> list[DefenseEntry]:
    """A ``{calibrate = ...}`` or ``{tune = ...}`` defense entry: one entry per drop (a list of drops is
    one stage: one calibration each, or one tuning study choosing at each)."""
    kind = "calibrate" if "calibrate" in item else "tune"
    keys, drop_key = (CALIBRATE_KEYS, "drop") if kind == "calibrate" else (TUNE_KEYS, "delta")
    name = item[kind]
    line = lines.of_value(str(name), "defenses") if isinstance(name, str) else lines.of_key("defenses")

    def bad(message: str) -> ValueError:
        return lines.error(line, f"{kind} entry {item!r}: {message}")

    if "calibrate" in item and "tune" in item:
        raise bad("an entry either calibrates or tunes")
    unknown = sorted(set(item) - set(keys))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
    if "validation" not in data:
        raise bad("a plan with calibrate/tune entries needs 'validation = N' (the validation images)")
    if not isinstance(name, str):
        raise bad(f"{kind} names a preset (a string)")
    from ..defenses import preset
    from ..defenses.spec import PRESETS

    if kind == "calibrate":
        try:
            defense = preset(name)
        except (KeyError, ValueError):
            defense = None
        if defense is None or len(defense.specs) != 1 or not defense.randomized:
            one_kind = [p for p in PRESETS if len(PRESETS[p][0]) == 1 and preset(p).randomized]
            raise bad(f"calibrate needs a one-kind noise preset: {', '.join(one_kind)}")
        name = defense.name
    elif name not in TUNED_PRESETS:
        raise bad(f"tune tunes {', '.join(TUNED_PRESETS)}, not {name!r}")
    drops = item.get(drop_key)
    drops = drops if isinstance(drops, list) else [drops]
    if not drops or not all(
        isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d < 1 for d in drops
    ):
        raise bad(f"{drop_key} must be a fraction in (0, 1) such as 0.01 for 1%, or a list of them")
    drops = sorted({float(d) for d in drops})
    for key in ("method", "level"):
        if key in item and not isinstance(item[key], str):
            raise bad(f"{key} must be a string")
    if "level" in item and len(drops) > 1:
        raise bad("level labels one drop; give one entry per drop, or leave level out")
    fields: dict[str, object] = {}
    for key, least in (("trials", 1), ("population", 2)):
        if key in item:
            value = item[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise bad(f"{key} must be an integer >= {least}")
            fields[key] = value
    for key in ("screen", "full"):
        if key in item:
            value = item[key]
            ok = isinstance(value, list) and len(value) == 2
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            if not ok:
                raise bad(f"{key} is [images, budget] (two positive integers)")
            if isinstance(data["validation"], int) and value[0] > data["validation"]:
                raise bad(
                    f"{key} asks for {value[0]} images; the plan has {data['validation']} validation images"
                )
            fields[key] = tuple(value)
    stage = Stage(kind, name, tuple(drops), **fields)
    method = item.get("method", name)
    return [
        DefenseEntry(name, method, item.get("level", f"≈{100 * d:g}%"), stage=stage, drop=d) for d in drops
    ]
