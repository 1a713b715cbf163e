"""The worst case over every attack run on one table row (model x method x level).

An image counts as robust in the worst case only if *no* attack run on the row broke it: each run is
read at its largest budget, and the runs are joined per image on the image's dataset index. Only runs
under the same threat model (norm, eps) are joined; when the runs of a row attacked different image
sets, the worst case is over the images all of them attacked (their intersection) and the tables say
so. By construction the worst case is at most every single run's robust accuracy on those images.

Attack kinds come from the registry (``attack_class(name).kind``: score, decision, white-box,
transfer); a name the registry does not know (a store written by another version) counts as a score
attack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..attacks import attack_class, is_attack
from .confirm import robust_confirmed_at
from .stats import wilson_interval

if TYPE_CHECKING:
    from .paper import Run

KINDS = ("score", "decision", "white-box", "transfer")
"""The attack kinds, in the order of the worst-case table's columns."""

QUERY_KINDS = ("score", "decision")

WHITEBOX_NAMES = {
    "fgsm": "FGSM",
    "mifgsm": "MI-FGSM",
    "cw": "CW",
    "eotpgd": "EOT-PGD",
}
"""Column names of the white-box attacks whose name takes no hyper-parameter (seed 001 Table 1)."""

Threat = tuple[str, float] | None
RowKey = tuple[str, str, str]


def attack_kind(name: str) -> str:
    """``"score"``, ``"decision"``, ``"white-box"`` or ``"transfer"``; an unregistered name is a score
    attack."""
    if not is_attack(name):
        return "score"
    cls = attack_class(name)
    return getattr(cls, "kind", "") or ("decision" if cls.output == "labels" else "score")


def _source_name(source: str) -> str:
    """A transfer source as a column label: a checkpoint path by its file stem, a zoo name as is."""
    if "/" in source or "\\" in source or source.endswith((".pt", ".pth", ".ckpt")):
        return Path(source).stem
    return source


def attack_label(attack: str, args: Mapping[str, object], eot: int = 1, bpda: bool = False) -> str:
    """The column name of an attack run: the registry name for query attacks, the papers' names for
    white-box attacks (``PGD-20``, ``AutoAttack-rand``, ...), ``transfer (square from base)`` for a
    transfer attack; `` M=<eot>`` and `` BPDA`` mark EOT and straight-through runs."""
    kind = attack_kind(attack)
    if kind == "transfer":
        source = _source_name(str(args.get("source", "base")))
        label = f"transfer ({args.get('attack', 'square')} from {source})"
    elif kind == "white-box":
        if attack == "pgd":
            label = f"PGD-{args.get('steps', 20)}"
        elif attack == "autoattack":
            version = str(args.get("version", "standard"))
            label = "AutoAttack" + ("" if version == "standard" else f"-{version}")
        elif attack == "eotpgd" and int(args.get("eot_iter", 10)) != 10:
            label = f"EOT-PGD-{args['eot_iter']}"  # seed 004's EOT-80
        elif attack == "npixel":
            label = f"{args.get('pixels', 1)}-pixel"
        else:
            label = WHITEBOX_NAMES.get(attack, attack)
    else:
        label = attack
    if eot > 1:
        label += f" M={eot}"
    if bpda:
        label += " BPDA"
    return label


def threat_key(settings: Mapping[str, object]) -> Threat:
    """(norm, eps) of a run's threat model, None when its settings have none."""
    threat = settings.get("threat")
    if not isinstance(threat, Mapping):
        return None
    return str(threat.get("norm")), float(threat.get("eps", 0.0))


def threat_text(threat: Threat) -> str:
    return "threat unknown" if threat is None else f"{threat[0]} {threat[1]:g}"


def robust_images(run: Run, *, confirmed: bool = False) -> dict[int, bool]:
    """Per dataset index: the run left the image robust at its largest budget (``confirmed``: by
    confirmation, see :mod:`.confirm`)."""
    robust: dict[int, bool] = {}
    for r in run.results:
        ok = robust_confirmed_at(r, run.budget) if confirmed else r.robust_at(run.budget)
        robust[r.dataset_index] = robust.get(r.dataset_index, True) and ok
    return robust


@dataclass(frozen=True)
class WorstCase:
    """The worst case of one row under one threat model: ``images`` are the dataset indices every
    run attacked, ``robust`` those no run broke; ``differing`` when the runs attacked different image
    sets (``images`` is then their intersection). ``robust_confirmed``: the images no run broke by
    confirmation (a success counts only if the majority of its fresh passes misclassify the returned
    example; a run without confirmation data by its decision), None when no run has confirmation data."""

    runs: tuple[Run, ...]
    images: tuple[int, ...]
    robust: tuple[int, ...]
    differing: bool
    threat: Threat
    _per_run: tuple[dict[int, bool], ...] = field(repr=False, compare=False)
    robust_confirmed: tuple[int, ...] | None = None

    @property
    def confirmed(self) -> bool:
        """Some run of the worst case has confirmation data."""
        return self.robust_confirmed is not None

    @property
    def n(self) -> int:
        return len(self.images)

    @property
    def accuracy(self) -> float | None:
        """Worst-case robust accuracy (%), None when the runs share no image."""
        return 100 * len(self.robust) / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """95% Wilson interval (%) of :attr:`accuracy` over the ``n`` images."""
        if not self.n:
            return None
        low, high = wilson_interval(len(self.robust), self.n)
        return 100 * low, 100 * high

    @property
    def accuracy_confirmed(self) -> float | None:
        """Worst-case robust accuracy (%) by confirmation; None without confirmation data or images."""
        if self.robust_confirmed is None or not self.n:
            return None
        return 100 * len(self.robust_confirmed) / self.n

    @property
    def interval_confirmed(self) -> tuple[float, float] | None:
        """95% Wilson interval (%) of :attr:`accuracy_confirmed` over the ``n`` images."""
        if self.robust_confirmed is None or not self.n:
            return None
        low, high = wilson_interval(len(self.robust_confirmed), self.n)
        return 100 * low, 100 * high

    def accuracy_of(self, run: Run) -> float | None:
        """``run``'s robust accuracy (%) at its largest budget on the worst case's images."""
        if not self.n:
            return None
        return 100 * sum(self.outcomes_of(run).values()) / self.n

    def outcomes_of(self, run: Run) -> dict[int, bool]:
        """Per image of the worst case (dataset index): ``run`` left it robust at its largest budget."""
        robust = next(p for r, p in zip(self.runs, self._per_run, strict=True) if r is run)
        return {d: robust[d] for d in self.images}

    @property
    def outcomes(self) -> dict[int, bool]:
        """Per image of the worst case (dataset index): no run broke it (for paired comparisons)."""
        kept = set(self.robust)
        return {d: d in kept for d in self.images}


def worst_case(runs: Sequence[Run]) -> WorstCase | None:
    """Join ``runs`` (one row, one threat model) per image; None when none has results.

    Clean-only runs (attack ``"none"``) and runs without results are left out; runs under different
    threat models are a ``ValueError`` (group them with :func:`row_worst_cases`).
    """
    runs = tuple(r for r in runs if r.attack != "none" and r.results)
    if not runs:
        return None
    threats = {threat_key(r.settings) for r in runs}
    if len(threats) > 1:
        listed = ", ".join(sorted(map(threat_text, threats)))
        raise ValueError(f"a worst case joins runs under one threat model, got {listed}")
    per_run = tuple(robust_images(r) for r in runs)
    sets = [set(p) for p in per_run]
    common = sorted(set.intersection(*sets))
    robust = tuple(d for d in common if all(p[d] for p in per_run))
    confirmed = None
    if any(r.confirmed for r in runs):
        per_run_confirmed = [robust_images(r, confirmed=True) for r in runs]
        confirmed = tuple(d for d in common if all(p[d] for p in per_run_confirmed))
    differing = any(s != sets[0] for s in sets)
    return WorstCase(runs, tuple(common), robust, differing, threats.pop(), per_run, confirmed)


def row_worst_cases(runs: Sequence[Run]) -> dict[RowKey, dict[Threat, WorstCase]]:
    """Per row (model, method, level) and threat model, the worst case over its attacked runs."""
    groups: dict[RowKey, dict[Threat, list[Run]]] = {}
    for run in runs:
        if run.attack == "none" or not run.results:
            continue
        key = (run.model, run.method, run.level)
        groups.setdefault(key, {}).setdefault(threat_key(run.settings), []).append(run)
    out: dict[RowKey, dict[Threat, WorstCase]] = {}
    for key, by_threat in groups.items():
        for threat, mine in by_threat.items():
            wc = worst_case(mine)
            if wc is not None:
                out.setdefault(key, {})[threat] = wc
    return out


RULE_NOTE = (
    "Worst case: robust accuracy (%) where an image counts as robust only if no attack run on the row "
    "(score, decision, white-box, transfer, EOT; every table) broke it, each run at its largest budget; "
    "runs joined per image on the dataset index, under one threat model."
)
"""The rule, stated under the worst-case table."""

SHORT_RULE_NOTE = (
    "Worst case: an image counts as robust only if no attack run on the row (in any table) broke it, "
    "each run at its largest budget (worst_case: every attack, interval, gap)."
)
"""The rule, stated under every other table with a Worst case column."""
