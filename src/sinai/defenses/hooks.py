"""How code reaches the tensor a site exposes: one hook per site, and per-device noise generators.

:class:`SiteHook` is the one place that registers a hook for a :class:`~sinai.defenses.sites.Site`
(pre-hook on the first positional input, forward hook on the output, or the attention module's additive
``attn_mask``, with a boolean mask turned into an additive one); the defenses' noise, AAA's logit
post-processing (:class:`sinai.defenses.aaa.AAAHook`) and the analyses' gradient probes are
subclasses. :class:`Generators` keeps one seeded ``torch.Generator`` per device.
"""

from __future__ import annotations

import math
import secrets

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .sites import Site


class SiteHook:
    """What acts at one site: subclasses override :meth:`tensor` (``pre`` / ``post`` sites) and
    :meth:`attn_logits` (``attn_mask`` sites), and :meth:`enabled` to act only some of the time.

    :meth:`attach` registers the hook that fits ``site.hook`` and returns its handle.
    """

    def __init__(self, site: Site) -> None:
        self.site = site

    def enabled(self) -> bool:
        """Whether the hook acts on this call (when not, the module sees its inputs unchanged)."""
        return True

    def tensor(self, z: torch.Tensor) -> torch.Tensor:
        """The tensor that replaces ``z``, the site's input (``pre``) or output (``post``)."""
        raise NotImplementedError(f"{type(self).__name__} does not act on {self.site.hook!r} sites")

    def attn_logits(self, shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor | None:
        """An additive mask of ``shape`` (batch, heads, tokens, tokens) for the attention logits before
        softmax, on ``like``'s device and dtype; ``None`` leaves the module's call unchanged."""
        raise NotImplementedError(f"{type(self).__name__} does not act on attention sites")

    def attach(self) -> RemovableHandle:
        """Register the hook on ``site.module``; ``handle.remove()`` detaches it."""
        module = self.site.module
        if self.site.hook == "pre":
            return module.register_forward_pre_hook(self._pre)
        if self.site.hook == "post":
            return module.register_forward_hook(self._post)
        if self.site.hook == "mha_mask":
            return module.register_forward_pre_hook(self._mha_mask, with_kwargs=True)
        if self.site.hook == "intercept":
            from .intercept import Interceptor

            return Interceptor(self).attach()
        return module.register_forward_pre_hook(self._attn_mask, with_kwargs=True)

    def _pre(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.enabled():
            return None
        return (self.tensor(args[0]), *args[1:])

    def _post(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled():
            return None
        if not isinstance(output, torch.Tensor):
            if self.site.kind == "output":
                raise ValueError(
                    f"AAA needs a model whose output is a tensor of logits (N, classes), but this model "
                    f"returns {type(output).__name__}; wrap it so that forward returns the logits"
                )
            raise ValueError(
                f"feature noise needs a tensor output, but layer {self.site.name!r} returns "
                f"{type(output).__name__}; choose a layer that returns a single tensor"
            )
        return self.tensor(output)

    def _attn_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if not self.enabled():
            return None
        x = args[0] if args else kwargs["x"]
        logits = self.attn_logits((x.shape[0], module.num_heads, x.shape[1], x.shape[1]), x)
        if logits is None:
            return None
        mask = kwargs.get("attn_mask")
        if mask is not None:
            if mask.dtype == torch.bool:  # True = attend, as in SDPA
                mask = torch.zeros(mask.shape, device=x.device, dtype=x.dtype).masked_fill(~mask, -math.inf)
            logits = logits + mask
        return args, {**kwargs, "attn_mask": logits}

    _MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")

    def _mha_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """``nn.MultiheadAttention``: its float ``attn_mask`` (N * heads, L, S), batch-major as the module
        splits heads, is added to the logits before softmax; a boolean mask there means True = masked."""
        if not self.enabled():
            return None
        bound = dict(zip(self._MHA_ARGS, args, strict=False)) | kwargs
        query, key = bound["query"], bound["key"]
        heads = module.num_heads
        if query.dim() == 3:
            n, length, source = (
                (query.shape[0], query.shape[1], key.shape[1])
                if module.batch_first
                else (query.shape[1], query.shape[0], key.shape[0])
            )
        else:  # unbatched (L, E)
            n, length, source = 1, query.shape[0], key.shape[0]
        logits = self.attn_logits((n, heads, length, source), query)
        if logits is None:
            return None
        mask = bound.get("attn_mask")
        if mask is not None:
            if mask.dtype == torch.bool:  # True = not allowed to attend, in nn.MultiheadAttention
                mask = torch.zeros(mask.shape, device=query.device, dtype=query.dtype).masked_fill(
                    mask, -math.inf
                )
            logits = logits + (mask.reshape(n, heads, length, source) if mask.dim() == 3 else mask)
        shape = (n * heads, length, source) if query.dim() == 3 else (heads, length, source)
        # is_causal with a mask lets the module drop the mask for a causal kernel: the noise must stay
        return (), {**bound, "attn_mask": logits.reshape(shape), "is_causal": False}


class Generators:
    """One ``torch.Generator`` per device, created on first use and seeded with ``seed``.

    ``seed=None`` seeds each from OS entropy (serving: an attacker must never be able to replay the
    noise). Noise is drawn on the device of the tensor it is added to.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._by_device: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int | None) -> None:
        """Restart every stream from ``seed`` (the generators are made again on next use)."""
        self.seed = seed
        self._by_device.clear()

    def __call__(self, device: torch.device) -> torch.Generator:
        gen = self._by_device.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
            self._by_device[device] = gen
        return gen

    def devices(self) -> list[torch.device]:
        """The devices a generator has been made for, in order of first use."""
        return list(self._by_device)
