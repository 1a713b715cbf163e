"""What acts where: per-site-kind specs, defenses as mappings of them, and the named presets.

RND/SND, FND, SINAI and AAA are not separate code paths: each is a :class:`Defense`, a mapping from
site kinds to a spec. The noise kinds take a :class:`NoiseSpec`; ``std`` is always a standard deviation
(the papers write "nu" for it and sometimes mean a variance; SINAI's tables only make sense as a std, so
that is what we use). The ``output`` kind (the model's logits) takes an :class:`AAASpec`: AAA's
deterministic per-query post-processing of the logits (:mod:`sinai.defenses.aaa`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from dataclasses import fields as dataclass_fields
from types import MappingProxyType
from typing import TYPE_CHECKING

from ..checks import ArgumentTypeError

if TYPE_CHECKING:
    from torch import nn

SITE_KINDS: tuple[str, ...] = ("input", "feature", "attn", "gelu", "relu", "output", "approx")
"""Where a defense can act: the image, a layer's output, attention logits, pre-GeLU and pre-ReLU logits
(noise, :class:`NoiseSpec`), the model's output logits (AAA, :class:`AAASpec`), and the convolutions
that carry a learned approximation branch (SINAI-selective, :class:`SelectiveSpec`)."""

SELECTIVE_KINDS: tuple[str, ...] = ("gelu", "relu")
"""Kinds whose spec may have ``ratio`` < 1 (noise on the smallest pre-activation logits only)."""

SELECTIONS: tuple[str, ...] = ("exact", "threshold")

NON_SMOOTH_KINDS: tuple[str, ...] = ("output", "approx")
"""Kinds whose step is not differentiable (its gradient is zero or wrong), so a white-box attack needs
BPDA's straight-through backward there: AAA's ``output`` (its logits come out of an optimisation,
detached from the input) and SINAI-selective's ``approx`` (rounding in Q(x) and a top-k mask; under BPDA
the gradient is the exact conv's); the noise kinds are all differentiable."""

AAA_VARIANTS: tuple[str, ...] = ("linear", "sine")
"""AAA's margin maps (Chen et al. 2022, the authors' ``AAALinear`` and ``AAASine``)."""


def check_std(std: object) -> float:
    """``std`` if it is a finite number >= 0, else a ``ValueError`` saying what a std is."""
    if not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0 (a standard deviation), got {std!r}")
    return std


def check_std_vector(std: object) -> tuple[float, ...]:
    """``std`` as a tuple of floats if it is a non-empty sequence of finite numbers >= 0 (one standard
    deviation per feature), else a one-line ``ValueError``."""
    values = std.tolist() if hasattr(std, "tolist") else std
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"a std vector must be a non-empty sequence of numbers, got {std!r:.60}")
    bad = [
        v
        for v in values
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
    ]
    if bad:
        raise ValueError(
            f"a std vector needs finite numbers >= 0 (one standard deviation per feature); "
            f"std=vec[{len(values)}] has {len(bad)} bad entries, e.g. {bad[0]!r:.40}"
        )
    return tuple(float(v) for v in values)


def check_ratio(ratio: object) -> float:
    """``ratio`` if it is a number in [0, 1], else a ``ValueError`` saying what a ratio is."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1] (the fraction of logits that get noise), got {ratio!r}")
    return ratio


@dataclass(frozen=True)
class NoiseSpec:
    """Gaussian noise of standard deviation ``std`` at every site of one kind.

    ``ratio``: for ``gelu``/``relu``, the fraction of pre-activation logits of each sample that get
    noise, chosen as the smallest values (SINAI's proxy for the smallest gradient norm; for ReLU the
    negatives come first). 1.0 is uniform injection.
    ``selection``: ``"exact"`` picks the smallest ``ceil(ratio * n)`` logits per sample on every
    forward; ``"threshold"`` noises logits below a per-site threshold calibrated once on clean data
    (cheaper, same share on average; see ``DefendedModel.calibrate_thresholds``).
    ``layers``: for ``feature``, names of modules whose outputs get noise; empty means the
    penultimate features (the input of the classifier head).

    ``std`` may also be a vector (a sequence of finite floats >= 0, stored as a tuple): one standard
    deviation per entry of the last (feature) dimension of the site's tensor, e.g. MFDV-SNN's learned
    sigma (seed 004, Sec. 3: z = h + sigma * eps).
    ``learned``: ``std`` (a number) scales the per-feature std the model learned (MFDV-SNN,
    :mod:`sinai.models.mfdv`); ``feature`` kind at the classifier head only. It is resolved into a
    vector std when the defense is settled on a model (:func:`sinai.defenses.sites.resolve_learned`);
    a model without a learned std is then a ``ValueError``.
    """

    std: float | tuple[float, ...]
    ratio: float = 1.0
    selection: str = "exact"
    layers: tuple[str, ...] = ()
    learned: bool = False

    def __post_init__(self) -> None:
        std = self.std
        if not isinstance(std, (int, float)):  # a vector (or a numpy / torch scalar)
            std = std.tolist() if hasattr(std, "tolist") else std
        std = check_std_vector(std) if isinstance(std, (list, tuple)) else float(check_std(std))
        check_ratio(self.ratio)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not isinstance(self.learned, bool):
            raise ValueError(f"learned must be True or False, got {self.learned!r}")
        if self.learned and (isinstance(std, tuple) or self.layers):
            raise ValueError(
                "a learned std is a number scaling the model's learned per-feature std at the classifier "
                "head's input: give std as one number and no layers"
            )
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "ratio", float(self.ratio))
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def active(self) -> bool:
        """Whether the spec changes anything (some ``std > 0``): the kinds a model must have."""
        std = self.std
        return std > 0 if isinstance(std, float) else any(v > 0 for v in std)

    def describe_std(self) -> str:
        """``0.1``; a vector as ``vec[128] mean 0.31``; a learned std as ``learned`` or ``learned*0.5``."""
        std = self.std
        if self.learned:
            return "learned" if std == 1.0 else f"learned*{std:g}"
        if isinstance(std, float):
            return f"{std:g}"
        return f"vec[{len(std)}] mean {sum(std) / len(std):.3g}"


def _check_number(name: str, value: object, meaning: str, *, positive: bool = True) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"AAA {name} must be a finite number {bound} ({meaning}), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class AAASpec:
    """AAA, Adversarial Attack on Attackers (Chen et al., NeurIPS 2022): per query, optimise the logits
    so that the top-1 / top-2 margin lands on a target that reverses the margin's trend inside
    attractor intervals of width ``tau``, while the top-1 probability keeps the original confidence.

    ``variant``: ``"linear"`` (target ``a - alpha * (m0 - a)``, ``a`` the centre of the interval of the
    margin ``m0``) or ``"sine"`` (``m0 - 0.7 tau sin((1 - 2 (m0 - a) / tau) pi)``). ``alpha``: the
    linear map's slope, in (0, 1] (above 1 the first interval's targets go below zero, which would flip
    the prediction). ``beta``: weight of the calibration term ``|p(z)[c] - max softmax(z0 / T)|``;
    ``temperature``: ``T``. ``lr`` and ``steps``: Adam on the logits. Defaults are the authors' code
    (``victim.py``: interval 6, reverse step 1, calibration weight 5, lr 0.1, 100 iterations, T 1).
    """

    variant: str = "linear"
    tau: float = 6.0
    alpha: float = 1.0
    beta: float = 5.0
    temperature: float = 1.0
    lr: float = 0.1
    steps: int = 100

    def __post_init__(self) -> None:
        if self.variant not in AAA_VARIANTS:
            raise ValueError(f"unknown AAA variant {self.variant!r}; variants: {', '.join(AAA_VARIANTS)}")
        tau = _check_number("tau", self.tau, "the width of the attractor intervals on the logit margin")
        alpha = _check_number("alpha", self.alpha, "the slope of the linear margin map, in (0, 1]")
        if alpha > 1:
            raise ValueError(
                f"AAA alpha must be in (0, 1] (the slope of the linear margin map; above 1 the targets of "
                f"the first interval are negative and would flip the prediction), got {self.alpha!r}"
            )
        beta = _check_number("beta", self.beta, "the weight of the calibration loss", positive=False)
        temperature = _check_number("temperature", self.temperature, "T of the reference softmax")
        lr = _check_number("lr", self.lr, "Adam's step size on the logits")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"AAA steps must be an integer >= 1 (Adam steps per query), got {self.steps!r}")
        if self.variant == "sine" and alpha != 1.0:
            raise ValueError(
                "AAA alpha is the slope of the linear variant's margin map; the sine variant does not use it "
                f"(got alpha={self.alpha!r}): drop alpha or use variant=linear"
            )
        checked = {"tau": tau, "alpha": alpha, "beta": beta, "temperature": temperature, "lr": lr}
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def active(self) -> bool:
        """AAA always changes the logits."""
        return True

    def describe(self) -> str:
        """``linear tau=6``, plus every field that differs from its default."""
        text = f"{self.variant} tau={self.tau:g}"
        for f in dataclass_fields(self)[2:]:
            value = getattr(self, f.name)
            if value != f.default:
                text += f" {'T' if f.name == 'temperature' else f.name}={value:g}"
        return text


SELECTIVE_DEFAULT_RATIO = 0.9
"""SINAI-selective's default share of approximated outputs (seed 001: 90% on CIFAR)."""


@dataclass(frozen=True)
class SelectiveSpec:
    """SINAI-selective (seed 001 Sec. 3.2, Eq. 2; App. B): at every conv with a learned approximation
    branch, the outputs with the largest approximation z~ are computed exactly and the rest take z~.

    ``ratio``: the share of each sample's C*H*W conv outputs that take z~, in (0, 1); the top
    ``ceil((1 - ratio) * C*H*W)`` by signed z~ stay exact. ``n``, ``m``: the N:M variant instead: in every
    group of ``m`` consecutive channels at one spatial position, the ``n`` smallest by z~ are approximated
    (1 <= n < m; App. B's BitOPs fit "n approximated"); ``ratio`` is then ``n / m``. ``n = m = 0``: top-k.
    Deterministic (no noise is drawn): :mod:`sinai.defenses.selective`.
    """

    ratio: float = SELECTIVE_DEFAULT_RATIO
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r < 1:
            raise ValueError(
                f"SINAI-selective ratio must be in (0, 1) (the share of each sample's conv outputs "
                f"approximated; the paper uses 0.9), got {r!r}"
            )
        for name in ("n", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"SINAI-selective {name} must be an integer >= 0 (N:M), got {value!r}")
        if (self.n == 0) != (self.m == 0):
            raise ValueError(
                f"N:M needs both n and m (e.g. n=2,m=8: 2 approximated in every 8 channels), got n={self.n}, "
                f"m={self.m}"
            )
        if self.m:
            if not 1 <= self.n < self.m:
                raise ValueError(
                    f"N:M needs 1 <= N < M (N of every M outputs approximated), got N={self.n} > M={self.m}"
                    if self.n > self.m
                    else f"N:M needs 1 <= N < M (N of every M outputs approximated), got {self.n}:{self.m}"
                )
            share = self.n / self.m
            if r != SELECTIVE_DEFAULT_RATIO and r != share:
                raise ValueError(
                    f"give either ratio or N:M, not both: {self.n}:{self.m} approximates {share:g}, got "
                    f"ratio={r!r}"
                )
            r = share
        object.__setattr__(self, "ratio", float(r))

    @property
    def active(self) -> bool:
        """SINAI-selective always changes the conv outputs."""
        return True

    def describe(self) -> str:
        """``ratio=0.9`` or ``2:8`` (N:M)."""
        return f"{self.n}:{self.m}" if self.m else f"ratio={self.ratio:g}"


Spec = NoiseSpec | AAASpec | SelectiveSpec
"""What a site kind maps to: noise (:class:`NoiseSpec`), AAA (:class:`AAASpec`, ``output`` only) or
SINAI-selective (:class:`SelectiveSpec`, ``approx`` only)."""


def spec_type(kind: str) -> type[NoiseSpec] | type[AAASpec] | type[SelectiveSpec]:
    """The spec class site ``kind`` takes: :class:`AAASpec` for ``output``, :class:`SelectiveSpec` for
    ``approx``, :class:`NoiseSpec` otherwise."""
    return {"output": AAASpec, "approx": SelectiveSpec}.get(kind, NoiseSpec)


@dataclass(frozen=True)
class Defense:
    """A mapping from site kinds to specs (:class:`NoiseSpec`; :class:`AAASpec` for ``output``), with a
    name for reports.

    ``require="all"``: every kind must exist in the protected model. ``"any"``: kinds the model lacks
    are skipped (SINAI on a CNN has no attention), but at least one must exist.

    ``mc``: Monte-Carlo passes of the deployed prediction rule. With ``mc > 1`` the defended model's
    output is ``log(mean over mc noisy passes of softmax)`` (MFDV-SNN predicts with the mean of 15
    passes, seed 004 Sec. 4): its argmax is the mean-probability prediction and it is differentiable,
    so white-box attacks attack that rule. Only for defenses that draw noise.

    ``given``: the site kinds the user set a field of (:func:`parse_defense`, keywords of :func:`preset`).
    A model that lacks one of them is an error even under ``require="any"``: ``SINAI:attn.std=0.3`` on a
    CNN must not silently become SINAI's ReLU part with default noise. Not part of equality or storage.
    """

    specs: Mapping[str, Spec] = field(default_factory=dict)
    name: str = "custom"
    require: str = "all"
    mc: int = 1
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.specs, Mapping):
            raise ValueError(f"defense specs must be a mapping of site kind to spec, got {self.specs!r:.80}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a defense name must be a non-empty string, got {self.name!r}")
        if isinstance(self.mc, bool) or not isinstance(self.mc, int) or self.mc < 1:
            raise ValueError(
                f"mc must be an integer >= 1 (noisy passes averaged per prediction), got {self.mc!r}"
            )
        for kind, spec in self.specs.items():
            check_kind(kind)
            expected = spec_type(kind)
            if not isinstance(spec, expected):
                what = {
                    "output": "AAA post-processes the logits",
                    "approx": "SINAI-selective mixes exact and approximate conv outputs",
                }.get(kind, "noise at these sites")
                article = "an" if expected is AAASpec else "a"
                raise ArgumentTypeError(
                    f"spec for {kind!r} must be {article} {expected.__name__} ({what}), "
                    f"got {type(spec).__name__}"
                )
            if isinstance(spec, (AAASpec, SelectiveSpec)):
                continue
            if spec.ratio != 1.0 and kind not in SELECTIVE_KINDS:
                raise ValueError(
                    f"ratio applies only to {SELECTIVE_KINDS} sites, not {kind!r}; remove it or use ratio=1"
                )
            if spec.layers and kind != "feature":
                raise ValueError(f"layers applies only to 'feature' sites, not {kind!r}")
            if spec.learned and kind != "feature":
                raise ValueError(f"a learned std applies only to 'feature' sites, not {kind!r}")
        if self.require not in ("all", "any"):
            raise ValueError(f"require must be 'all' or 'any', got {self.require!r}")
        object.__setattr__(self, "specs", MappingProxyType(dict(self.specs)))
        object.__setattr__(
            self, "given", frozenset(self.given) & set(self.specs)
        )  # (replace() may drop kinds)
        if self.mc > 1 and not self.randomized:
            raise ValueError(
                f"mc={self.mc} averages noisy passes, but defense {self.name} draws no noise; "
                "use mc=1 (the default)"
            )

    def __reduce__(self) -> tuple:
        """Pickle and deep-copy through the constructor (the read-only ``specs`` view cannot be pickled):
        Ray, worker processes and ``copy.deepcopy`` of a protected model need it."""
        return (type(self), (dict(self.specs), self.name, self.require, self.mc, self.given))

    def restricted_to(self, kinds: set[str] | frozenset[str]) -> Defense:
        """The same defense with only the site kinds in ``kinds`` (what applies to a given model)."""
        return replace(
            self, specs={k: s for k, s in self.specs.items() if k in kinds}, given=self.given & set(kinds)
        )

    def check_settled(self, settled: Defense, model: nn.Module) -> Defense:
        """``settled`` (this defense restricted to ``model``'s sites) if every kind the user set
        (:attr:`given`) survived; a one-line ``ValueError`` naming the unusable fields otherwise."""
        lost = [kind for kind in self.specs if kind in self.given and kind not in settled.specs]
        if lost:
            from .sites import find_sites

            have = [k for k, sites in find_sites(model).items() if sites]
            label = getattr(model, "name", None) or type(model).__name__
            raise ValueError(
                f"defense {self.name} sets {', '.join(k + '.*' for k in lost)}, but {label} has no "
                f"{'/'.join(lost)} sites (it has: {', '.join(have) or 'none'}); remove those fields or use a "
                "model that has them"
            )
        return settled

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (what the result store keeps); :meth:`from_dict` gives the same defense back.
        ``mc`` is written only when it is not 1 (older stored results keep their form)."""
        data: dict[str, object] = {
            "name": self.name,
            "require": self.require,
            "specs": {kind: _spec_dict(s) for kind, s in self.specs.items()},
        }
        if self.mc != 1:
            data["mc"] = self.mc
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Defense:
        """The defense :meth:`to_dict` wrote (``Defense.from_dict(d.to_dict()) == d``)."""
        specs = data.get("specs", {})
        if not isinstance(specs, Mapping):
            raise ValueError(f"defense specs must be a mapping of site kind to spec, got {specs!r}")
        return cls(
            {kind: spec_type(check_kind(kind))(**spec) for kind, spec in specs.items()},
            name=data.get("name", "custom"),
            require=data.get("require", "all"),
            mc=data.get("mc", 1),
        )

    def for_model(self, model: nn.Module) -> Defense:
        """This defense restricted to the site kinds ``model`` has (SINAI on a CNN is its ReLU part).

        Raises ``ValueError`` when a kind with noise is missing and ``require="all"``, or when none of
        them exists (e.g. attention noise on a CNN).
        """
        from .sites import settle

        return self.check_settled(settle(self, model)[0], model)

    @property
    def non_smooth(self) -> tuple[str, ...]:
        """The kinds of this defense with a non-differentiable step (what ``--bpda`` bypasses)."""
        return tuple(k for k in self.specs if k in NON_SMOOTH_KINDS)

    @property
    def randomized(self) -> bool:
        """Whether a forward draws noise (some noise kind with ``std > 0``); AAA alone is deterministic."""
        return any(isinstance(s, NoiseSpec) and s.active for s in self.specs.values())

    def describe(self) -> str:
        """Short human-readable form, e.g. ``SINAI(attn std=1, gelu std=0.1 ratio=0.7)`` or
        ``AAA(output linear tau=6)``."""
        parts = []
        for kind, spec in self.specs.items():
            if isinstance(spec, (AAASpec, SelectiveSpec)):
                parts.append(f"{kind} {spec.describe()}")
                continue
            text = f"{kind} std={spec.describe_std()}"
            if spec.ratio != 1.0:
                text += f" ratio={spec.ratio:g}"
            if spec.layers:
                text += f" layers={'|'.join(spec.layers)}"
            parts.append(text)
        if self.mc != 1:
            parts.append(f"mc={self.mc}")
        return f"{self.name}({', '.join(parts)})"

    def to_text(self, *, digits: int | None = None) -> str:
        """The text :func:`parse_defense` reads back into this defense, e.g. ``SINAI:relu.std=0.7,
        relu.ratio=0.37`` (what ``--defense`` takes). ``digits``: significant digits of numbers (default:
        exact). Settled on a model (:meth:`for_model`), the text names only the kinds the model has, so
        the same model reads it back to the same defense. A vector std has no text form (``ValueError``).
        """
        if self.name == "none" and not self.specs:
            return "none"
        number = (lambda v: repr(float(v))) if digits is None else (lambda v: f"{v:.{digits}g}")
        named = self.name in PRESETS and self.require == PRESETS[self.name][1]
        items = None
        if named:
            kinds = PRESETS[self.name][0]
            items = _text_items(self.specs, _DEFAULTS[self.name], number, bare=len(kinds) == 1)
        if items is None:  # no preset name, or a spec the preset cannot express: a free composition
            items = _text_items(self.specs, DEFAULT_SPECS, number, bare=False)
            named = False
            if items is None:
                raise ValueError(f"{self.describe()} has no text form (a learned std settled into a vector)")
            if not items:
                raise ValueError(f"{self.describe()} has no site kind to write")
        if self.mc != 1:
            items.append(f"mc={self.mc}")
        body = ",".join(items)
        return f"{self.name}:{body}" if named and body else (self.name if named else body)


def _text_items(
    specs: Mapping[str, Spec], defaults: Mapping[str, Spec], number: Callable[[float], str], *, bare: bool
) -> list[str] | None:
    """``kind.field=value`` items of ``specs`` relative to ``defaults`` (``field=value`` when ``bare``);
    ``None`` when some spec cannot be written relative to them."""
    items = []
    for kind, spec in specs.items():
        default = defaults.get(kind)
        if default is None or type(default) is not type(spec):
            return None
        prefix = "" if bare else f"{kind}."
        if isinstance(spec, NoiseSpec):
            if not isinstance(spec.std, float) or spec.learned != default.learned:
                return None
            items.append(f"{prefix}std={number(spec.std)}")
            if spec.ratio != default.ratio:
                items.append(f"{prefix}ratio={number(spec.ratio)}")
            if spec.selection != default.selection:
                items.append(f"{prefix}selection={spec.selection}")
            if spec.layers:
                items.append(f"{prefix}layers={'|'.join(spec.layers)}")
            continue
        always = {"variant"} if isinstance(spec, AAASpec) else ({"n", "m"} if spec.m else {"ratio"})
        for f in dataclass_fields(spec):
            value = getattr(spec, f.name)
            if f.name not in always and (value == getattr(default, f.name) or f.name == "ratio"):
                continue  # (a SelectiveSpec's ratio is written only without N:M)
            key = "T" if f.name == "temperature" else f.name
            shown = number(value) if isinstance(value, float) else str(value)
            items.append(f"{prefix}{key}={shown}")
    return items


def _spec_dict(spec: Spec) -> dict[str, object]:
    if isinstance(spec, (AAASpec, SelectiveSpec)):
        return {f.name: getattr(spec, f.name) for f in dataclass_fields(spec)}
    std = spec.std if isinstance(spec.std, float) else list(spec.std)
    data = {"std": std, "ratio": spec.ratio, "selection": spec.selection, "layers": list(spec.layers)}
    if spec.learned:  # written only when set: older stored results keep their form
        data["learned"] = True
    return data


def check_kind(kind: str) -> str:
    """Return ``kind`` or raise a ``ValueError`` listing the known site kinds."""
    if kind not in SITE_KINDS:
        raise ValueError(f"unknown site kind {kind!r}; known kinds: {', '.join(SITE_KINDS)}")
    return kind


# Default stds: the papers' ImageNet ViT-B / ResNet-50 settings at ~1% drop (SINAI Table 6), as stds.
# AAA: the authors' defaults (victim.py), checked against the embedded MNIST CNN's margins (aaa.py).
DEFAULT_SPECS: Mapping[str, Spec] = MappingProxyType(
    {
        "input": NoiseSpec(std=0.02),
        "feature": NoiseSpec(std=0.04),
        "attn": NoiseSpec(std=0.7),
        "gelu": NoiseSpec(std=0.06, ratio=0.7),
        "relu": NoiseSpec(std=0.23, ratio=0.37),
        "output": AAASpec(),
        "approx": SelectiveSpec(),
    }
)

_PRESETS: dict[str, tuple[tuple[str, ...], str]] = {}
_BUILDERS: dict[str, Callable[..., Defense]] = {}
_DEFAULTS: dict[str, Mapping[str, Spec]] = {}  # preset -> its default spec per kind

PRESETS: Mapping[str, tuple[tuple[str, ...], str]] = MappingProxyType(_PRESETS)
"""Named defenses, in registration order: name -> (site kinds, require). Filled by
:func:`register_defense`; read it, do not write it."""


def register_defense(
    *names: str, defaults: Mapping[str, Spec] | None = None
) -> Callable[[Callable[..., Defense]], Callable[..., Defense]]:
    """Register a preset under each of ``names``: the decorated function takes one spec per site kind
    (its parameter names are the kinds; :class:`AAASpec` for ``output``, :class:`NoiseSpec` otherwise)
    and returns the :class:`Defense` (the registry names it); :func:`preset` and :func:`parse_defense`
    then know it::

        @register_defense("RND")
        def rnd(input: NoiseSpec) -> Defense:
            return Defense({"input": input})

    ``defaults``: this preset's default spec of some kinds, instead of :data:`DEFAULT_SPECS` (MFDV's
    ``feature`` std is the model's learned one).
    """

    def decorator(build: Callable[..., Defense]) -> Callable[..., Defense]:
        kinds = tuple(check_kind(k) for k in inspect.signature(build).parameters)
        own = {kind: (defaults or {}).get(kind, DEFAULT_SPECS[kind]) for kind in kinds}
        defense = build(**own)
        if tuple(defense.specs) != kinds:
            raise ValueError(f"preset {names}: its builder must return exactly the kinds {kinds}")
        for name in names:
            if name.lower() in {k.lower() for k in _PRESETS}:
                raise ValueError(f"defense preset {name!r} is already registered")
            _PRESETS[name] = (kinds, defense.require)
            _BUILDERS[name] = build
            _DEFAULTS[name] = MappingProxyType(own)
        return build

    return decorator


def list_defenses() -> tuple[str, ...]:
    """The preset names, in registration order."""
    return tuple(_PRESETS)


# Named defenses: RND/SND = input noise (Byun et al.; Qin et al.), FND = randomized feature defense
# (Nguyen et al., penultimate layer), SINAI = attention + logit-selective GeLU/ReLU noise.


@register_defense("none")
def _none() -> Defense:
    """No noise: the undefended model through the same protocol."""
    return Defense({})


@register_defense("RND", "SND")
def _input_noise(input: NoiseSpec) -> Defense:
    """RND (Byun et al.) and SND (Qin et al.): Gaussian noise on the input image."""
    return Defense({"input": input})


@register_defense("FND")
def _fnd(feature: NoiseSpec) -> Defense:
    """Randomized feature defense (Nguyen et al.): noise on the penultimate features."""
    return Defense({"feature": feature})


@register_defense("SINAI")
def _sinai(attn: NoiseSpec, gelu: NoiseSpec, relu: NoiseSpec) -> Defense:
    """SINAI: attention-logit noise plus logit-selective pre-GeLU / pre-ReLU noise, on the kinds a
    model has (a CNN gets its ReLU part)."""
    return Defense({"attn": attn, "gelu": gelu, "relu": relu}, require="any")


@register_defense("SINAI-Attn")
def _sinai_attn(attn: NoiseSpec) -> Defense:
    """SINAI's attention part alone."""
    return Defense({"attn": attn})


@register_defense("SINAI-FFN")
def _sinai_ffn(gelu: NoiseSpec) -> Defense:
    """SINAI's logit-selective pre-GeLU part alone."""
    return Defense({"gelu": gelu})


@register_defense("AAA")
def _aaa(output: AAASpec) -> Defense:
    """AAA (Chen et al. 2022): deterministic post-processing of the logits (``sinai.defenses.aaa``)."""
    return Defense({"output": output})


@register_defense("SINAI-selective")
def _sinai_selective(approx: SelectiveSpec) -> Defense:
    """SINAI-selective (seed 001): the top 1 - ratio conv outputs by the learned approximation exact, the
    rest approximated (``SINAI-selective:ratio=0.8``, ``SINAI-selective:n=2,m=8``); needs a model trained
    with ``sinai train mnist-cnn --selective`` (:mod:`sinai.defenses.selective`)."""
    return Defense({"approx": approx})


@register_defense("MFDV", defaults={"feature": NoiseSpec(std=1.0, learned=True)})
def _mfdv(feature: NoiseSpec) -> Defense:
    """MFDV-SNN (seed 004): z = h + sigma * eps at the classifier head's input, sigma the per-feature std
    the model learned (``sinai train mnist-cnn --mfdv``, :mod:`sinai.models.mfdv`), read when the defense
    is settled on the model. ``MFDV:std=S`` scales it; ``MFDV:mc=15`` predicts with the mean of 15
    passes, as the paper."""
    return Defense({"feature": feature})


def preset(name: str, **specs: Spec | Mapping[str, object] | float) -> Defense:
    """Build a named defense; keyword arguments per kind override the default spec.

    A value may be a spec, a mapping of its fields, or (noise kinds) a bare number for ``std``::

        preset("RND", input=0.03)
        preset("SINAI", attn=1.0, gelu={"std": 0.1, "ratio": 0.7})
        preset("AAA", output={"tau": 4.0, "variant": "sine"})

    Every kind set here must exist in the model the defense is used on (:attr:`Defense.given`); a
    field that would change nothing (``ratio=0``, ``selection`` without a ratio < 1) or a defense that
    adds nothing at all (every std 0) is a ``ValueError``: use ``"none"`` for the undefended model.
    """
    return _check_effect(_preset(name, specs))


def _preset(name: str, specs: Mapping[str, Spec | Mapping[str, object] | float]) -> Defense:
    """:func:`preset` without the check that the defense adds something (``parse_defense`` adds ``mc``
    first)."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"a defense name must be a string such as 'RND', got {name!r:.60}")
    key = _preset_key(name)
    kinds, _ = PRESETS[key]
    unknown = set(specs) - set(kinds)
    if unknown:
        raise ValueError(f"preset {key} has site kinds {kinds}; cannot set {sorted(unknown)}")
    resolved = {kind: _as_spec(specs.get(kind), _DEFAULTS[key][kind], kind) for kind in kinds}
    for kind in specs:
        _check_given_spec(kind, resolved[kind], _given_fields(specs[kind], resolved[kind]))
    return replace(_BUILDERS[key](**resolved), name=key, given=frozenset(specs))


def _given_fields(value: object, spec: Spec) -> set[str]:
    """The fields of ``spec`` a user set with ``value`` (a mapping of fields, a bare number or a spec)."""
    if isinstance(value, Mapping):
        return set(value)
    if isinstance(value, NoiseSpec):
        defaults = {f.name: f.default for f in dataclass_fields(NoiseSpec) if f.name != "std"}
        return {"std", *(name for name, default in defaults.items() if getattr(value, name) != default)}
    return {"ratio"} if isinstance(spec, SelectiveSpec) else {"std"}


def _check_given_spec(kind: str, spec: Spec, fields: set[str]) -> None:
    """A one-line ``ValueError`` for a field the user set that would change nothing."""
    if not isinstance(spec, NoiseSpec):
        return
    if "ratio" in fields and spec.ratio == 0:
        raise ValueError(
            f"{kind}.ratio=0 puts noise on no {kind} logit (ratio is the share that gets noise, in (0, 1]); "
            f"to switch {kind} off set {kind}.std=0, or leave the kind out"
        )
    if "selection" in fields and (kind not in SELECTIVE_KINDS or spec.ratio == 1):
        raise ValueError(
            f"{kind}.selection={spec.selection} changes nothing: selection picks which logits get noise when "
            f"ratio < 1, which only {'/'.join(SELECTIVE_KINDS)} sites have"
            + ("" if kind not in SELECTIVE_KINDS else f" (here {kind}.ratio=1: every logit gets noise)")
        )


def _check_effect(defense: Defense) -> Defense:
    """``defense`` unless it is a named or composed defense that adds nothing (every noise std 0)."""
    if defense.name != "none" and not any(spec.active for spec in defense.specs.values()):
        raise ValueError(
            f"defense {defense.describe()} adds nothing (every std is 0): it is the undefended model; "
            "use 'none' for it, or a std > 0"
        )
    return defense


def _preset_key(name: str) -> str:
    lookup = {k.lower(): k for k in PRESETS}
    key = lookup.get(name.lower())
    if key is None:
        raise ValueError(f"unknown defense {name!r}; presets: {', '.join(PRESETS)} (or compose kinds)")
    return key


def _as_spec(value: Spec | Mapping[str, object] | float | None, default: Spec, kind: str) -> Spec:
    if value is None:
        return default
    if isinstance(value, (NoiseSpec, AAASpec, SelectiveSpec)):
        return value
    if isinstance(value, Mapping):
        known = [f.name for f in dataclass_fields(default)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown {kind} field(s) {unknown}; fields: {', '.join(known)}")
        return replace(default, **value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(
            f"the {kind!r} kind takes a spec, a mapping of its fields or a number, got {value!r:.60}"
        )
    if isinstance(default, AAASpec):
        raise ValueError(
            f"the {kind!r} kind takes AAA fields, not a bare number: e.g. {kind}={{'tau': 6.0}} "
            f"(fields: {', '.join(_AAA_FIELDS)})"
        )
    if isinstance(default, SelectiveSpec):
        return replace(default, ratio=value)  # a bare number is the ratio
    return replace(default, std=value)


def parse_defense(text: str) -> Defense:
    """Parse the command-line form of a defense.

    ``"RND"`` (preset defaults), ``"RND:std=0.03"`` (single-kind presets take bare fields),
    ``"SINAI:attn.std=1.0,gelu.std=0.1,gelu.ratio=0.7"``, ``"FND:std=0.1,layers=blocks.2|blocks.3"``,
    ``"AAA"``, ``"AAA:tau=4,variant=sine"`` (AAA fields: variant, tau, alpha, beta, T, lr, steps), or a
    free composition without a preset name: ``"input.std=0.01,attn.std=0.5"`` or
    ``"input.std=0.02,output.tau=6"``. ``mc=N`` (no kind) is the defense's Monte-Carlo passes per
    prediction (:class:`Defense`): ``"MFDV:mc=15"``, ``"RND:std=0.05,mc=15"``.

    Each field may be given once; the kinds named must exist in the model the defense is used on, and a
    field or defense that changes nothing is an error (see :func:`preset`).
    """
    if not isinstance(text, str):
        raise ArgumentTypeError(f"a defense text must be a string such as 'RND:std=0.05', got {text!r:.60}")
    text = text.strip()
    if not text:
        raise ValueError("empty defense; use a preset name such as RND, FND, SINAI or 'none'")
    head, _, rest = text.partition(":")
    if "=" in head:  # free composition, no preset name
        name, rest, kinds = None, text, ()
    else:
        name = _preset_key(head)
        kinds = PRESETS[name][0]
    fields: dict[str, dict[str, object]] = {}
    mc, seen = 1, {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"expected field=value in defense {text!r}, got {item!r}")
        if key.strip() == "mc":  # a defense-level field, not a site kind's
            _once(seen, "mc", item, text)
            try:
                mc = int(value.strip())
            except ValueError:
                raise ValueError(
                    f"mc must be an integer >= 1 (noisy passes per prediction), got {value!r}"
                ) from None
            continue
        kind, dot, attr = key.strip().rpartition(".")
        if not dot:
            if len(kinds) != 1:
                raise ValueError(
                    f"say which site kind {attr!r} belongs to, e.g. 'gelu.{attr}={value}' (in {text!r})"
                )
            kind = kinds[0]
        kind = check_kind(kind)
        _once(seen, f"{kind}.{_field_name(kind, attr)}", item, text)
        fields.setdefault(kind, {})[_field_name(kind, attr)] = _parse_field(kind, attr, value.strip())
    if name is not None:
        defense = _preset(name, fields)
        return _check_effect(defense if mc == 1 else replace(defense, mc=mc))
    specs = {k: replace(DEFAULT_SPECS[k], **v) for k, v in fields.items()}
    for kind, spec in specs.items():
        _check_given_spec(kind, spec, set(fields[kind]))
    return _check_effect(Defense(specs, name="custom", mc=mc, given=frozenset(specs)))


def _once(seen: dict[str, str], field: str, item: str, text: str) -> None:
    """Record ``field`` (given by ``item``); a ``ValueError`` when ``text`` gives it twice."""
    if field in seen:
        raise ValueError(
            f"defense {text!r} sets {field} twice ({seen[field]!r} and {item!r}); give each field once"
        )
    seen[field] = item


_AAA_FIELDS = ("variant", "tau", "alpha", "beta", "T", "lr", "steps")


def _field_name(kind: str, attr: str) -> str:
    return "temperature" if kind == "output" and attr == "T" else attr


def _parse_field(kind: str, attr: str, value: str) -> object:
    if kind == "output":
        return _parse_aaa_field(attr, value)
    if kind == "approx":
        return _parse_selective_field(attr, value)
    if attr in ("std", "ratio"):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{attr} must be a number, got {value!r}") from None
    if attr == "layers":
        return tuple(filter(None, value.split("|")))
    if attr == "selection":
        return value
    raise ValueError(f"unknown defense field {attr!r}; fields: std, ratio, selection, layers")


def _parse_selective_field(attr: str, value: str) -> object:
    if attr not in ("ratio", "n", "m"):
        raise ValueError(f"unknown SINAI-selective field {attr!r}; fields: ratio, n, m (N:M)")
    try:
        return float(value) if attr == "ratio" else int(value)
    except ValueError:
        what = "a number in (0, 1)" if attr == "ratio" else "an integer (N:M)"
        raise ValueError(f"SINAI-selective {attr} must be {what}, got {value!r}") from None


def _parse_aaa_field(attr: str, value: str) -> object:
    if attr == "variant":
        return value
    if attr == "steps":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"AAA steps must be an integer, got {value!r}") from None
    if attr in ("tau", "alpha", "beta", "T", "temperature", "lr"):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"AAA {attr} must be a number, got {value!r}") from None
    raise ValueError(f"unknown AAA field {attr!r}; fields: {', '.join(_AAA_FIELDS)} (T = temperature)")
