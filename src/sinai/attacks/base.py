"""What every attack shares: the registry, the final ``__call__`` around ``run``, and small helpers.

An attack is a class registered with ``@register_attack("name")``, with keyword-only hyper-parameters
(the papers' defaults; ``None`` where the default depends on the norm, resolved at run time from the
oracle's threat model) and one method, ``run(oracle, x, y, *, seed) -> x_adv``, batched over all images
that are still live: each iteration makes one oracle call for the live set (``oracle.live()``), and
images leave as soon as the oracle says they are done. ``attack(oracle, seed=...)`` checks the oracle
against the attack, runs it on the oracle's images and returns the final images with the oracle's
verified adversarial examples in the rows of the images it broke (as foolbox 3's ``Attack.__call__``).
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from typing import ClassVar, TypeVar, final

import torch
import torch.nn.functional as F

from .oracle import Oracle
from .threat import NORMS

LOSSES = ("margin", "ce", "prob")

_REGISTRY: dict[str, type[Attack]] = {}
AttackT = TypeVar("AttackT", bound="Attack")


def register_attack(name: str) -> Callable[[type[AttackT]], type[AttackT]]:
    """Class decorator: register an :class:`Attack` under ``name`` (its ``name`` attribute)."""
    key = name.lower()

    def register(cls: type[AttackT]) -> type[AttackT]:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(
                f"attack {key!r} is registered twice ({_REGISTRY[key].__name__}, {cls.__name__})"
            )
        cls.name = key
        if not cls.kind:
            cls.kind = "score" if cls.output == "scores" else "decision"
        _REGISTRY[key] = cls
        return cls

    return register


def list_attacks() -> tuple[str, ...]:
    """Names of the registered attacks, in the order they were registered."""
    return tuple(_REGISTRY)


def is_attack(name: object) -> bool:
    """Whether ``name`` is a registered attack (case-insensitive)."""
    return isinstance(name, str) and name.lower() in _REGISTRY


def attack_class(name: str) -> type[Attack]:
    """The class registered under ``name`` (case-insensitive)."""
    if not is_attack(name):
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(_REGISTRY)} (or 'none')")
    return _REGISTRY[name.lower()]


def make_attack(name: str, **kwargs: object) -> Attack:
    """Build the attack ``name`` with its keyword hyper-parameters; an unknown keyword, or a value of a
    type its annotation does not allow (``p_init="abc"``), is a one-line ValueError."""
    cls = attack_class(name)
    params = cls.parameters()
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate here: the constructor checks alone
        hints = {}
    for key, value in kwargs.items():
        if key not in params:
            listed = ", ".join(params) if params else "none"
            raise ValueError(f"{cls.name} has no parameter {key!r}; its parameters: {listed}")
        if key in hints and not _fits(value, hints[key]):
            raise ValueError(
                f"{cls.name} {key} must be {_describe(hints[key])}, "
                f"got {value!r:.60} ({type(value).__name__})"
            )
    return cls(**kwargs)


_KINDS = {
    float: "a finite number",
    int: "an integer",
    bool: "true or false",
    str: "a text",
    type(None): "None",
}


def _fits(value: object, hint: object) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (an int is a float; a bool is neither)."""
    if hint is typing.Any or hint is object:
        return True
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, a) for a in args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(hint) or hint
    return not isinstance(origin, type) or isinstance(value, origin)


def _describe(hint: object) -> str:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(a) for a in args)
    origin = typing.get_origin(hint) or hint
    return _KINDS.get(origin, f"a {getattr(origin, '__name__', origin)}")


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A fresh generator seeded with ``seed`` (make one per run, so runs are reproducible)."""
    return torch.Generator(device=device).manual_seed(seed)


class Attack:
    """Base of the query-based attacks. Subclasses implement ``run``; ``__call__`` is the entry point."""

    name: ClassVar[str] = "attack"
    norms: ClassVar[tuple[str, ...]] = NORMS
    output: ClassVar[str] = "scores"  # what the attack needs from the oracle: "scores" or "labels"
    #: "score", "decision" (query-based; set from ``output`` when registered), "white-box" or "transfer"
    kind: ClassVar[str] = ""
    gradients: ClassVar[bool] = False  # the attack differentiates through the model (autograd on)

    def __new__(cls, *args: object, **kwargs: object) -> Attack:
        self = super().__new__(cls)
        self._given = dict(kwargs)  # the hyper-parameters as given, for kwargs()
        return self

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        """Names of the attack's hyper-parameters (its constructor's keyword-only arguments)."""
        signature = inspect.signature(cls.__init__)
        return tuple(p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY)

    @classmethod
    def check_norm(cls, norm: str) -> None:
        """Raise a ValueError when the attack is not defined for ``norm``."""
        if norm not in cls.norms:
            raise ValueError(f"{cls.name} is defined for {', '.join(cls.norms)} only, not {norm}")

    def kwargs(self) -> dict[str, object]:
        """The hyper-parameters given to the constructor (``make_attack(name, **kwargs())`` rebuilds it)."""
        return dict(self._given)

    @final
    def __call__(self, oracle: Oracle, *, seed: int = 0) -> torch.Tensor:
        """Attack every image of ``oracle`` (seeded by ``seed``); return the final images on its device.

        Rows of the images the oracle verified as broken hold its adversarial example.
        """
        if oracle.output != self.output:
            raise ValueError(
                f"{self.name} is a {self.kind}-based attack: "
                f"it needs an oracle with output={self.output!r}, got {oracle.output!r}"
            )
        self.check_norm(oracle.threat.norm)
        with torch.enable_grad() if self.gradients else torch.no_grad():
            x_adv = self.run(oracle, oracle.x, oracle.labels, seed=seed)
        return with_verified(oracle, x_adv.to(oracle.device))

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, *, seed: int) -> torch.Tensor:
        """Attack every image of ``x`` (labels ``y``, image i is oracle index i); return the final x_adv.

        ``x`` and ``y`` are the oracle's images and labels (on its device); the threat model is
        ``oracle.threat``. Called by ``__call__``, which has checked the oracle against the attack.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.parameters())
        return f"{type(self).__name__}({params})"


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted margin ``z_y - max_{j != y} z_j`` per row: negative means misclassified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return true - other


def score_loss(logits: torch.Tensor, y: torch.Tensor, kind: str = "margin") -> torch.Tensor:
    """Per-row loss an untargeted attack minimizes: margin, log p_y (``"ce"``: minus CE) or p_y."""
    if kind == "margin":
        return margin_loss(logits, y)
    logp = F.log_softmax(logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)
    return logp if kind == "ce" else logp.exp()


def check_loss(kind: str, allowed: tuple[str, ...] = LOSSES) -> str:
    """Validate a ``loss=`` keyword."""
    if kind not in allowed:
        raise ValueError(f"loss must be one of {', '.join(allowed)}, got {kind!r}")
    return kind


def with_verified(oracle: Oracle, x_adv: torch.Tensor) -> torch.Tensor:
    """``x_adv`` with the oracle's verified adversarial example in the rows of the images it broke."""
    if oracle.x_adv is None:
        return x_adv
    found = oracle.success & ~torch.isnan(oracle.x_adv.flatten(1)).any(1)
    return torch.where(found.view(-1, *([1] * (x_adv.dim() - 1))), oracle.x_adv, x_adv)


def l2_normalize(t: torch.Tensor) -> torch.Tensor:
    """Each row of ``t`` divided by its l2 norm (zero rows stay zero)."""
    norms = t.flatten(1).norm(dim=1).clamp_min(1e-12)
    return t / norms.view(-1, *([1] * (t.dim() - 1)))
