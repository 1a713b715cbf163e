"""One validated configuration per evaluation run: what makes its numbers, and the run's key.

Every parameter of a run (attack and its hyper-parameters, defense, threat model, budgets, seeds,
votes, shards) is checked once, here, where it enters; the protocol, the Oracle and the attack then
take it as given. ``settings()`` is the run's identity in the result store: the same configuration
on the same images resumes the same run.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..attacks import Attack, QueryRules, make_attack
from ..attacks.threat import ThreatModel
from ..checks import ArgumentTypeError, check_count
from ..defenses import Defense
from .store import SCHEMA_VERSION


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """The settings of one robust-accuracy run (RFD section 4.1, SINAI section 5.1).

    ``attack``: a registered attack name or ``"none"`` (clean accuracy only), with keyword
    ``attack_args``. ``budgets``: counted queries at which robust accuracy is reported; one run with
    the largest. ``passes``: noisy passes of the clean accuracy (M). ``eot``: samples per query (each
    counted). ``votes``: uncounted passes that confirm a success on a randomized model (RFD App. D.4),
    ``lucky``: the single query decides instead (RFD Table 15). ``vote_rule``: "sequential" (a vote
    whose false acceptance over the whole attack is at most ``vote_alpha`` for a candidate misclassified
    at most ``vote_rate`` of the time) or "fixed" (the papers' majority of ``votes``; see
    :class:`~sinai.attacks.oracle.QueryRules`). ``confirm``: fresh uncounted passes that re-check every
    returned adversarial example after the attack (0 = none). ``shard_size``: images attacked and
    stored together; (seed, shard) seeds their noise and attack. ``track_mismatch``: record P_mis
    (SND Table 5). ``bpda``: a white-box attack passes its gradients straight through the defense's
    non-smooth steps (Athalye et al. 2018; AAA's logit optimisation). ``describe``: identifying
    labels (model, dataset, method, level, stage), stored with the run.
    """

    attack: str = "none"
    attack_args: Mapping[str, object] = field(default_factory=dict)
    defense: Defense = field(default_factory=lambda: Defense(name="none"))
    threat: ThreatModel = field(default_factory=lambda: ThreatModel("linf", 0.05))
    budgets: tuple[int, ...] = (1000,)
    seed: int = 0
    passes: int = 3
    eot: int = 1
    votes: int = 9
    lucky: bool = False
    vote_rule: str = "sequential"
    vote_alpha: float = 0.01
    vote_rate: float = 0.5
    confirm: int = 101
    shard_size: int = 100
    track_mismatch: bool = False
    bpda: bool = False
    describe: Mapping[str, object] = field(default_factory=dict)
    rules: QueryRules = field(init=False, repr=False, compare=False)
    attacker: Attack | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.defense, Defense):
            raise ArgumentTypeError(
                f"defense must be a Defense (parse text with parse_defense), got {self.defense!r:.60}"
            )
        if not isinstance(self.threat, ThreatModel):
            raise ArgumentTypeError(f"threat must be a ThreatModel, got {self.threat!r:.60}")
        if not isinstance(self.attack, str):
            raise ArgumentTypeError(f"attack must be an attack's name or 'none', got {self.attack!r:.60}")
        for name in ("attack_args", "describe"):
            if not isinstance(getattr(self, name), Mapping):
                raise ArgumentTypeError(f"{name} must be a mapping, got {getattr(self, name)!r:.60}")
        for name in ("lucky", "track_mismatch", "bpda"):
            if not isinstance(getattr(self, name), bool):
                raise ArgumentTypeError(f"{name} must be True or False, got {getattr(self, name)!r:.60}")
        if isinstance(self.budgets, (str, bytes)) or not isinstance(self.budgets, Iterable):
            raise ValueError(f"budgets must be positive numbers of queries, got {self.budgets!r:.60}")
        whole = lambda b: isinstance(b, numbers.Integral) or (isinstance(b, float) and b.is_integer())
        if not all(whole(b) and not isinstance(b, bool) for b in self.budgets):
            raise ValueError(f"budgets must be positive whole numbers of queries, got {self.budgets!r:.60}")
        budgets = tuple(sorted({int(b) for b in self.budgets}))
        if not budgets or budgets[0] < 1:
            raise ValueError(f"budgets must be positive numbers of queries, got {self.budgets!r}")
        check_count("seed", self.seed, 0, "the image selection, noise and attack seed")
        if self.seed >= 2**32:  # each shard's seed, seed * 1_000_003 + shard, must fit a torch seed
            raise ValueError(f"seed must be an integer in [0, 2**32) (the run's seed), got {self.seed}")
        check_count("passes", self.passes, 1, "noisy passes per clean accuracy")
        check_count("shard_size", self.shard_size, 1, "images attacked and stored together")
        what = "uncounted passes confirming a success; odd, so that a vote has a majority; the papers use 9"
        check_count("votes", self.votes, 1, what)
        if self.votes % 2 == 0:
            raise ValueError(f"votes must be an odd integer >= 1 ({what}), got {self.votes}")
        for name, value in (("vote_alpha", self.vote_alpha), ("vote_rate", self.vote_rate)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                what = (
                    "level of the sequential vote"
                    if name == "vote_alpha"
                    else "misclassification rate it must beat"
                )
                raise ValueError(f"{name} must be a number in (0, 1) (the {what}), got {value!r}")
        attack = self.attack.lower()
        if attack == "none" and self.attack_args:
            raise ValueError(f"attack arguments {dict(self.attack_args)} given without an attack")
        object.__setattr__(self, "attack", attack)
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "attack_args", MappingProxyType(dict(self.attack_args)))
        object.__setattr__(self, "describe", MappingProxyType(dict(self.describe)))
        # The Oracle's rules, checked here once (budget, eot, votes, lucky) and handed to every shard.
        rules = QueryRules(
            budgets[-1], self.eot, self.votes, self.lucky, vote_rule=self.vote_rule, alpha=self.vote_alpha,
            rate=self.vote_rate,
        )  # fmt: skip
        object.__setattr__(self, "rules", rules)
        check_count("confirm", self.confirm, 0, "fresh passes re-checking each returned example")
        object.__setattr__(self, "lucky", self.rules.lucky)
        object.__setattr__(self, "track_mismatch", bool(self.track_mismatch))
        # The attack, built once (an unknown name or hyper-parameter fails here); it keeps no state
        # between runs, and each shard gives it its own seed.
        attacker = None if attack == "none" else make_attack(attack, **self.attack_args)
        if attacker is not None:
            attacker.check_norm(self.threat.norm)
        object.__setattr__(self, "attacker", attacker)
        object.__setattr__(self, "bpda", bool(self.bpda))
        if self.bpda:
            if attacker is None or attacker.kind != "white-box":
                raise ValueError("bpda applies to white-box attacks (fgsm, pgd, ...), which take gradients")
            if not self.defense.non_smooth:
                raise ValueError(
                    f"bpda has nothing to bypass in {self.defense.describe()}: its steps are differentiable "
                    "(attack noise with eot instead); bpda applies to non-smooth defenses such as AAA"
                )
        clash = set(self.describe) & set(self._fields(0, []))
        if clash:
            raise ValueError(f"describe may not redefine the run settings {sorted(clash)}")

    @property
    def budget(self) -> int:
        """The largest budget: the one the run is attacked with."""
        return self.budgets[-1]

    def settings(self, *, images: int, dataset_indices: list[int]) -> dict[str, object]:
        """The run's identity in the result store (JSON-able; see ``evaluation.store``).

        ``bpda`` appears only when set, so the runs stored before it existed keep their keys.
        """
        extra = {"bpda": True} if self.bpda else {}
        return {**self.describe, **self._fields(images, dataset_indices), **extra}

    def _fields(self, images: int, dataset_indices: list[int]) -> dict[str, object]:
        return {
            "schema": SCHEMA_VERSION,
            "attack": self.attack,
            "attack_args": dict(self.attack_args),
            "defense": self.defense.to_dict(),
            "threat": self.threat.to_dict(),
            "budgets": list(self.budgets),
            "seed": self.seed,
            "passes": self.passes,
            "eot": self.eot,
            "votes": self.votes,
            "lucky": self.lucky,
            "vote_rule": self.vote_rule,
            **(
                {"vote_alpha": self.vote_alpha, "vote_rate": self.vote_rate}
                if self.vote_rule == "sequential"
                else {}
            ),
            "confirm": self.confirm,
            "shard_size": self.shard_size,
            "track_mismatch": self.track_mismatch,
            "images": images,
            "dataset_indices": list(dataset_indices),
        }
