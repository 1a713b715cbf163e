"""Find the places in a network where a defense acts (noise, or AAA on the output logits).

A site is a module plus how its hook reaches the tensor to perturb:

- ``input``: a pre-hook on the root module (the image in [0, 1] pixel units, before normalization);
- ``feature``: a pre-hook on the classifier head (penultimate features), or a forward hook on the
  output of named layers;
- ``attn``: a pre-hook on each timm ``Attention`` that supplies a float ``attn_mask``; SDPA and the
  manual path both compute ``softmax(q @ k.T * scale + mask)``, so the noise lands on the logits
  before softmax and the fused kernel is kept. The same on each ``nn.MultiheadAttention`` (torchvision's
  ViT), whose float ``attn_mask`` is added to the logits before softmax too (hook ``mha_mask``);
- ``gelu`` / ``relu``: a pre-hook on every ``nn.GELU`` / ``nn.ReLU`` module, which sees exactly the
  pre-activation logits (torchvision's shared ReLU fires it at each of its calls);
- intercepted ``attn`` / ``gelu`` / ``relu`` (hook ``intercept``): attention written out by hand
  (``(q @ k.transpose(-2, -1)) * scale`` then ``.softmax(-1)``, or ``F.scaled_dot_product_attention``) and
  ``F.gelu`` / ``F.relu`` called inside a module's forward, found by tracing one forward and replaced
  while that module's own forward runs (:mod:`sinai.defenses.intercept`; models with ``input_shape``
  or a Hugging Face ``config`` with ``num_channels`` and ``image_size``, e.g. ``transformers`` ViT/DeiT);
- ``output``: a forward hook on the root module, which sees the model's output logits (AAA,
  :mod:`sinai.defenses.aaa`; the hook checks at every forward that they are (N, classes) logits);
- ``approx``: a forward hook on every ``nn.Conv2d`` that carries a learned approximation branch (its child
  ``approx``, :mod:`sinai.models.selective`), which sees the conv's input and exact output (SINAI-selective,
  :mod:`sinai.defenses.selective`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from .spec import SITE_KINDS, Defense, NoiseSpec, check_kind


@dataclass(frozen=True)
class Site:
    """One injection point: ``kind``, the module's qualified ``name`` ("" = root) and the ``module``.

    ``hook`` says how the tensor is reached: ``"pre"`` (first positional input), ``"post"`` (output),
    ``"attn_mask"`` (a timm attention module's mask keyword), ``"mha_mask"`` (``nn.MultiheadAttention``'s
    ``attn_mask``) or ``"intercept"``: the calls of ``function`` (``softmax``, ``sdpa``, ``gelu``, ``relu``)
    numbered ``calls`` within the module's own forward (:mod:`sinai.defenses.intercept`).
    """

    kind: str
    name: str
    module: nn.Module
    hook: str
    function: str = ""
    calls: tuple[int, ...] = ()

    @property
    def how(self) -> str:
        """How the site is reached, for ``sinai sites``: ``hook`` or ``intercepted F.gelu`` and the like."""
        if self.hook != "intercept":
            return "hook" if self.hook in ("pre", "post") else f"hook {self.hook}"
        call = {"softmax": "softmax", "sdpa": "F.scaled_dot_product_attention"}.get(self.function)
        return f"intercepted {call or 'F.' + self.function}"


def _is_timm_attention(module: nn.Module) -> bool:
    try:
        from timm.layers import Attention
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    if isinstance(module, Attention):
        return True
    # Other timm attention variants qualify when their forward takes an additive attn_mask.
    params = inspect.signature(module.forward).parameters if hasattr(module, "num_heads") else {}
    return type(module).__module__.startswith("timm.") and "attn_mask" in params


def _is_mha(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention)


def _is_gelu(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) or type(module).__name__ == "GELU"


def _has_approx(module: nn.Module) -> bool:
    """A conv with a SINAI-selective approximation branch (``sinai.models.selective.ApproxBranch``)."""
    return isinstance(module, nn.Conv2d) and isinstance(getattr(module, "approx", None), nn.Module)


def classifier_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The module that maps penultimate features to class logits: ``get_classifier()`` or the last Linear."""
    inner = getattr(model, "net", model)
    get = getattr(inner, "get_classifier", None)
    head = get() if callable(get) else None
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(head, nn.Module) and id(head) in names and not isinstance(head, nn.Identity):
        return names[id(head)], head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            "found no classifier head (no get_classifier() and no nn.Linear) for 'feature' noise; "
            "name the layers explicitly, e.g. the defense 'FND:std=0.1,layers=<module name>'"
        )
    return linears[-1]


LEARNED_STD = "mfdv_log_sigma"
"""Name of the parameter, on the classifier head, holding log sigma: the per-feature noise std a model
learned for its head's input (MFDV-SNN, :class:`sinai.models.mfdv.MfdvTraining`)."""


def learned_std(model: nn.Module) -> torch.Tensor | None:
    """The per-feature std ``exp(mfdv_log_sigma)`` the model learned for its classifier head's input
    (detached), or ``None`` when it has none."""
    log_sigma = getattr(classifier_head(model)[1], LEARNED_STD, None)
    return None if log_sigma is None else log_sigma.detach().exp()


def resolve_learned(defense: Defense, model: nn.Module) -> Defense:
    """``defense`` with every ``learned`` spec replaced by a vector std: ``spec.std`` times the model's
    learned std (:func:`learned_std`); ``ValueError`` when the model learned none."""
    if not any(isinstance(s, NoiseSpec) and s.learned for s in defense.specs.values()):
        return defense
    sigma = learned_std(model)
    if sigma is None:
        name = getattr(model, "name", type(model).__name__)
        raise ValueError(
            f"{defense.name} needs a model trained with `sinai train mnist-cnn --mfdv` (a learned "
            f"per-feature noise std at its classifier head, MFDV-SNN); {name} has none"
        )
    specs = {
        kind: replace(s, std=(sigma.float() * s.std).tolist(), learned=False)
        if isinstance(s, NoiseSpec) and s.learned
        else s
        for kind, s in defense.specs.items()
    }
    return replace(defense, specs=specs)


def find_sites(
    model: nn.Module, kinds: Iterable[str] = SITE_KINDS, *, feature_layers: Iterable[str] = ()
) -> dict[str, list[Site]]:
    """Discover the sites of each requested kind; kinds the model lacks map to an empty list."""
    kinds = [check_kind(k) for k in kinds]
    modules = dict(model.named_modules())
    found: dict[str, list[Site]] = {kind: [] for kind in kinds}
    for kind in kinds:
        if kind == "input":
            found[kind].append(Site("input", "", model, "pre"))
        elif kind == "output":
            found[kind].append(Site("output", "", model, "post"))
        elif kind == "feature":
            layers = list(feature_layers)
            for name in layers:
                if name not in modules:
                    close = [n for n in modules if name.split(".")[-1] in n][:5]
                    hint = f"similar names: {close}" if close else "list them with describe_sites(model)"
                    raise ValueError(f"no layer named {name!r} in the model for feature noise; {hint}")
                found[kind].append(Site("feature", name, modules[name], "post"))
            if not layers:
                name, head = classifier_head(model)
                found[kind].append(Site("feature", name, head, "pre"))
        elif kind == "approx":
            found[kind] = [Site(kind, n, m, "post") for n, m in modules.items() if _has_approx(m)]
        else:
            found[kind] = [
                Site(kind, n, m, hook)
                for n, m in modules.items()
                if (hook := _module_hook(kind, m)) is not None
            ]
    traced = [k for k in found if k in INTERCEPTED_KINDS]
    if traced:
        _add_intercepted(model, found, traced)
    return found


INTERCEPTED_KINDS = ("attn", "gelu", "relu")
"""Kinds that may also be found by tracing a forward (:mod:`sinai.defenses.intercept`)."""


def _module_hook(kind: str, module: nn.Module) -> str | None:
    """The hook that reaches a ``kind`` site at ``module``, or ``None`` when it is no such site."""
    if kind == "attn":
        return "attn_mask" if _is_timm_attention(module) else "mha_mask" if _is_mha(module) else None
    if kind == "gelu":
        return "pre" if _is_gelu(module) else None
    return "pre" if kind == "relu" and isinstance(module, nn.ReLU) else None


def _add_intercepted(model: nn.Module, found: dict[str, list[Site]], kinds: list[str]) -> None:
    """Add the sites of ``kinds`` that a traced forward finds inside modules' own forwards."""
    from .intercept import KIND_OF_FUNCTION, functional_sites

    modules = dict(model.named_modules())
    hooked = {id(m) for m in modules.values() if any(_module_hook(k, m) for k in INTERCEPTED_KINDS)}
    order = {n: i for i, n in enumerate(modules)}
    for name, function, calls in functional_sites(model, hooked):
        kind = KIND_OF_FUNCTION[function]
        if kind in kinds and name in modules:
            found[kind].append(Site(kind, name, modules[name], "intercept", function, calls))
    for kind in kinds:
        found[kind].sort(key=lambda s: order.get(s.name, 0))


def describe_sites(model: nn.Module, *, how: bool = False) -> dict[str, list[str]]:
    """Names of the sites of every kind, for ``sinai sites`` and error messages; ``how=True`` follows each
    name by how it is reached in brackets (``[hook attn_mask]``, ``[intercepted F.gelu]``, ...)."""
    return {
        kind: [(s.name or f"<{kind}>") + (f" [{s.how}]" if how else "") for s in sites]
        for kind, sites in find_sites(model).items()
    }


def settle(defense: Defense, model: nn.Module) -> tuple[Defense, dict[str, list[Site]]]:
    """``defense`` restricted to the kinds ``model`` has, and its sites: one :func:`find_sites` walk.

    The kinds checked are those whose spec acts (noise with ``std > 0``, or AAA): a missing one raises
    ``ValueError`` when the defense requires all its kinds, or when none of them is present. The sites
    returned are those of the kinds that act, in the defense's kind order. A ``learned`` std is
    resolved here into the model's learned vector (:func:`resolve_learned`).
    """
    defense = resolve_learned(defense, model)
    feature = defense.specs.get("feature")
    found = find_sites(model, defense.specs, feature_layers=feature.layers if feature else ())
    present = {kind for kind, sites in found.items() if sites}
    noisy = [kind for kind, spec in defense.specs.items() if spec.active]
    missing = set(noisy) - present
    if missing and (defense.require == "all" or not present.intersection(noisy)):
        if "approx" in missing:
            raise ValueError(
                f"defense {defense.name} needs convolutions with learned approximation branches, but this "
                "model has none; train one with `sinai train mnist-cnn --selective` (mnist-cnn-selective)"
            )
        have = sorted(k for k, v in find_sites(model).items() if v)
        hint = ""
        if missing.intersection(INTERCEPTED_KINDS):
            from .intercept import input_shape

            if input_shape(model) is None:
                hint = (
                    "; attention and activations inside a module's forward are found by running it once, "
                    "which needs the model's image shape: set model.input_shape = (C, H, W)"
                )
        raise ValueError(
            f"defense {defense.name} needs {sorted(missing)} sites, but the model has none "
            f"(e.g. attention noise on a CNN); this model has: {', '.join(have)}{hint}"
        )
    return defense.restricted_to(present), {kind: found[kind] for kind in noisy if found[kind]}
