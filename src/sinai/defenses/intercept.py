"""Sites inside a module's forward: attention written out by hand and functional activations.

Many models compute attention without a module that takes a mask (``attn = (q @ k.transpose(-2, -1)) *
scale`` then ``attn.softmax(-1)``, or ``F.scaled_dot_product_attention``) and call ``F.gelu`` / ``F.relu``
inside a module's forward instead of owning an ``nn.GELU`` / ``nn.ReLU`` (Hugging Face's ``GELUActivation``
is such a module). Forward hooks cannot reach those tensors, so such a site is *intercepted*:

- **Discovery** (:func:`trace_calls`): one forward of the model on a small random batch (eval mode, no
  grad, training flags restored) under a :class:`~torch.overrides.TorchFunctionMode` that records, for
  every call of ``softmax`` / ``scaled_dot_product_attention`` / ``gelu`` / ``relu``, the innermost module
  whose own forward made it and the call's ordinal within that forward. A softmax counts as attention only
  when it runs over the last dimension of a tensor of rank >= 3 derived (through same-shape operations:
  scale, mask, max subtraction, casts) from a product of two activations (``matmul``, ``@``, ``bmm``,
  ``einsum``), i.e. over attention scores; the classifier's softmax over logits is not one. Calls inside
  modules that are hooked sites already (``nn.GELU``, ``nn.ReLU``, timm ``Attention``,
  ``nn.MultiheadAttention``) are left to their hooks.
- **Injection** (:class:`Interceptor`): a mode scoped to the site module's own forward (entered by a
  forward pre-hook, left by an always-called forward hook; calls made inside its child modules are not
  its own) replaces the recorded calls: ``softmax(s)`` becomes ``softmax(s + noise)`` and SDPA gets the
  noise in its additive ``attn_mask`` (so the noise lands on the attention logits before softmax, exactly
  as at a timm ``Attention``), ``gelu(z)`` / ``relu(z)`` become ``gelu(z')`` with ``z'`` what the site's
  hook makes of ``z`` (the same selection of the smallest logits as at an ``nn.GELU``). The hook object is
  the same :class:`~sinai.defenses.hooks.SiteHook`, so noise, probes and gradient rules work unchanged.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from .hooks import SiteHook

log = logging.getLogger(__name__)

FUNCTIONS: dict[Callable, str] = {
    torch.softmax: "softmax",
    F.softmax: "softmax",
    torch.Tensor.softmax: "softmax",
    F.scaled_dot_product_attention: "sdpa",
    F.gelu: "gelu",
    F.relu: "relu",
    torch.relu: "relu",
    torch.Tensor.relu: "relu",
    torch.relu_: "relu",
    torch.Tensor.relu_: "relu",
}
"""The functions an intercepted site replaces, by the name its :class:`~sinai.defenses.sites.Site` records."""

KIND_OF_FUNCTION = {"softmax": "attn", "sdpa": "attn", "gelu": "gelu", "relu": "relu"}
"""The site kind each intercepted function feeds."""

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_MATMULS = {
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.einsum,
}
_INPLACE = {torch.relu_, torch.Tensor.relu_}
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


def _softmax_dim(args: tuple, kwargs: dict) -> int | None:
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return dim if isinstance(dim, int) else None


class _Tracer(TorchFunctionMode):
    """Records (module name, function, ordinal, whether it qualifies) for each call of :data:`FUNCTIONS`."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip = skip  # ids of modules whose calls belong to their own hooks
        self.stack: list[tuple[str, nn.Module, dict[str, int]]] = []
        self.scores: dict[int, torch.Tensor] = {}  # tensors derived from q @ k^T (kept alive by the trace)
        self.calls: list[tuple[str, str, int, bool]] = []

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        name = FUNCTIONS.get(func)
        if name is not None and self.stack:
            module_name, module, counts = self.stack[-1]
            ordinal = counts.get(name, 0)
            counts[name] = ordinal + 1
            qualifies = id(module) not in self.skip
            if name == "softmax":
                z = args[0]
                dim = _softmax_dim(args, kwargs)
                last = dim is not None and dim in (-1, z.dim() - 1)
                qualifies = qualifies and last and z.dim() >= 3 and id(z) in self.scores
            self.calls.append((module_name, name, ordinal, qualifies))
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            tensors = _tensors(args, kwargs)
            if func in _MATMULS:
                activations = [t for t in tensors if not isinstance(t, nn.Parameter)]
                if len(activations) >= 2 and len(activations) == len(tensors) and out.dim() >= 3:
                    self.scores[id(out)] = out
            elif any(id(t) in self.scores and t.shape == out.shape for t in tensors):
                self.scores[id(out)] = out
        return out


def trace_calls(
    model: nn.Module, example: torch.Tensor, skip: set[int]
) -> list[tuple[str, str, tuple[int, ...]]]:
    """The intercepted sites of ``model``: (module name, function, ordinals of the qualifying calls), in
    module order, from one forward on ``example`` (eval mode, no grad; training flags are restored).

    ``skip``: ids of modules whose calls are not sites (they are hooked sites already)."""
    names = {id(m): n for n, m in model.named_modules()}
    tracer = _Tracer(skip)
    handles: list[RemovableHandle] = []

    def enter(module: nn.Module, args: tuple) -> None:
        tracer.stack.append((names[id(module)], module, {}))

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        tracer.stack.pop()

    modes = {m: m.training for m in model.modules()}
    # The hooks already on the model (other defenses, probes, the user's) sit the trace out: a trace
    # forward must leave no trace anywhere.
    saved = {m: {a: getattr(m, a) for a in _HOOK_DICTS if hasattr(m, a)} for m in model.modules()}
    try:
        for module, dicts in saved.items():
            for attr, value in dicts.items():
                setattr(module, attr, type(value)())
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        model.eval()
        devices = [example.device] if example.device.type == "cuda" else []
        # a model that draws random numbers in its forward must not see the global streams move
        with torch.random.fork_rng(devices=devices), torch.no_grad(), tracer:
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, dicts in saved.items():
            for attr, value in dicts.items():
                setattr(module, attr, value)
        for module, training in modes.items():
            module.training = training
    found: dict[tuple[str, str], list[int]] = {}
    for module_name, name, ordinal, qualifies in tracer.calls:
        if qualifies:
            ordinals = found.setdefault((module_name, name), [])
            if ordinal not in ordinals:
                ordinals.append(ordinal)
    order = {n: i for i, n in enumerate(names.values())}
    keys = sorted(found, key=lambda k: (order.get(k[0], 0), k[1]))
    return [(module_name, name, tuple(found[(module_name, name)])) for module_name, name in keys]


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, list]] = weakref.WeakKeyDictionary()


def input_shape(model: nn.Module) -> tuple[int, ...] | None:
    """The (C, H, W) images ``model`` takes, for the discovery forward: its ``input_shape`` attribute, else
    the first Hugging Face style ``config`` among its modules with ``num_channels`` and ``image_size`` (a
    ``transformers`` ViT/DeiT wrapped in a module that returns ``.logits``); ``None`` when neither says."""
    shape = getattr(model, "input_shape", None)
    if shape:
        return tuple(shape)
    for module in model.modules():
        config = getattr(module, "config", None)
        channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
        if isinstance(size, int):
            size = (size, size)
        sizes = (channels, *size) if isinstance(size, (tuple, list)) and len(size) == 2 else ()
        if sizes and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            return sizes
    return None


def example_input(model: nn.Module) -> torch.Tensor | None:
    """A random batch of 2 images of :func:`input_shape` in [0, 1] on the model's device, or ``None``."""
    shape = input_shape(model)
    if not shape:
        return None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.rand((2, *shape), generator=gen).to(device=device, dtype=dtype)


def functional_sites(model: nn.Module, skip: set[int]) -> list[tuple[str, str, tuple[int, ...]]]:
    """:func:`trace_calls` on an :func:`example_input`, cached per model (while its modules are the same);
    a model whose :func:`input_shape` is unknown or whose forward fails on the example has none."""
    example = example_input(model)
    if example is None:
        return []
    key = (tuple((n, id(m)) for n, m in model.named_modules()), tuple(example.shape), example.device)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        found = trace_calls(model, example, skip)
    except Exception as error:  # noqa: BLE001 - a model that cannot run the example has no traced sites
        log.warning("could not trace %s for functional sites: %s", type(model).__name__, error)
        found = []
    _CACHE[model] = (key, found)
    return found


class Interceptor(TorchFunctionMode):
    """The mode of one intercepted site: active during ``site.module``'s own forward while its hook is
    enabled; replaces the site's recorded calls (``site.function``, ordinals ``site.calls``)."""

    def __init__(self, hook: SiteHook) -> None:
        super().__init__()
        self.hook = hook
        site = hook.site
        self.function = site.function
        self.ordinals = frozenset(site.calls)
        self.stack: list[bool] = []  # True: the site module's own forward is innermost; False: a child's
        self.count = 0
        self.entered = False

    # -- scope: hooks on the site module and on its descendants
    def _enter(self, module: nn.Module, args: tuple) -> None:
        if not self.stack:
            self.count = 0
            if not self.hook.enabled():
                return
            self.__enter__()
            self.entered = True
        self.stack.append(True)

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self.stack:
            return
        self.stack.pop()
        if not self.stack and self.entered:
            self.entered = False
            self.__exit__(None, None, None)

    def _enter_child(self, module: nn.Module, args: tuple) -> None:
        if self.stack:
            self.stack.append(False)

    def _leave_child(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    def attach(self) -> RemovableHandle:
        """Register the scope hooks; the returned handle removes them all."""
        module = self.hook.site.module
        handles = [
            module.register_forward_pre_hook(self._enter),
            module.register_forward_hook(self._leave, always_call=True),
        ]
        for child in module.modules():
            if child is not module:
                handles.append(child.register_forward_pre_hook(self._enter_child))
                handles.append(child.register_forward_hook(self._leave_child, always_call=True))
        return _Handles(handles)

    # -- the replaced calls
    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if FUNCTIONS.get(func) != self.function or not self.stack or not self.stack[-1]:
            return func(*args, **kwargs)
        ordinal, self.count = self.count, self.count + 1
        if ordinal not in self.ordinals:
            return func(*args, **kwargs)
        if self.function == "softmax":
            z = args[0]
            noise = self.hook.attn_logits(tuple(z.shape), z)
            return func(*args, **kwargs) if noise is None else func(z + noise, *args[1:], **kwargs)
        if self.function == "sdpa":
            return self._sdpa(func, args, kwargs)
        z = args[0]
        inplace = func in _INPLACE or kwargs.get("inplace") or (func is F.relu and len(args) > 1 and args[1])
        new = self.hook.tensor(z)
        if inplace:  # the caller relies on z changing: noise enters z, then the in-place call
            z.copy_(new)
            return func(*args, **kwargs)
        return func(new, *args[1:], **kwargs)

    def _sdpa(self, func: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        q, k, v = args[:3]
        options = dict(zip(_SDPA_ARGS, args[3:], strict=False)) | kwargs
        shape = (*q.shape[:-1], k.shape[-2])
        noise = self.hook.attn_logits(tuple(shape), q)
        if noise is None:
            return func(*args, **kwargs)
        mask = options.get("attn_mask")
        if options.get("is_causal"):
            length, source = shape[-2], shape[-1]
            keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
            mask = keep if mask is None else mask & keep
            options["is_causal"] = False
        if mask is not None:
            if mask.dtype == torch.bool:  # True = attend, as in SDPA
                mask = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, -math.inf)
            noise = noise + mask
        options["attn_mask"] = noise
        return func(q, k, v, **options)


class _Handles:
    """Several hook handles removed as one."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


__all__ = [
    "FUNCTIONS",
    "KIND_OF_FUNCTION",
    "Interceptor",
    "example_input",
    "functional_sites",
    "input_shape",
    "trace_calls",
]
