"""Read pre-activation logits and per-sample gradients ``dL/dz`` at noise sites with one backward pass.

A *probe* is a zero tensor that requires grad, added to the tensor a site exposes (``z + probe``). The
gradient of the summed loss with respect to the probe is the gradient with respect to ``z``, and since
the samples of a batch do not interact in eval mode, row ``i`` of it is ``dL_i/dz_i``: the per-sample
gradient of every logit, from one backward pass. Probes leave the forward unchanged (they are zero) and
work where ``z`` is later modified in place (torchvision's ``ReLU(inplace=True)``), where
``z.retain_grad()`` would not. Attention sites get the probe as their additive ``attn_mask``, so the
gradient is the one with respect to the attention logits before softmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..attacks.base import score_loss
from ..defenses.hooks import SiteHook
from ..defenses.sites import Site, classifier_head, find_sites

LOSSES = ("margin", "ce")


@dataclass(frozen=True)
class Capture:
    """What one site call saw: the tensor entering it (``value``; ``None`` for attention) and ``grad``."""

    site: Site
    call: int
    value: torch.Tensor | None
    grad: torch.Tensor

    @property
    def key(self) -> tuple[str, int]:
        return (self.site.name, self.call)

    @property
    def label(self) -> str:
        """``name`` or ``name#call`` for modules called more than once in a forward (shared ReLU)."""
        name = self.site.name or "<input>"
        return name if self.call == 0 else f"{name}#{self.call}"


def attacker_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "margin") -> torch.Tensor:
    """Per-sample loss ``L``: the margin ``z_y - max_{j!=y} z_j`` (RFD eq. 3) or cross-entropy."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return score_loss(logits.float(), y, "margin") if loss == "margin" else -score_loss(logits, y, "ce")


class _Probe(SiteHook):
    """Adds a zero tensor that requires grad to what one site exposes, and records it."""

    def __init__(self, site: Site, records: list, calls: dict[int, int]) -> None:
        super().__init__(site)
        self.records = records
        self.calls = calls  # shared by the probes of one capture: call number per site

    def _record(self, value: torch.Tensor | None, probe: torch.Tensor) -> None:
        key = id(self.site)
        self.calls[key] = self.calls.get(key, -1) + 1
        self.records.append((self.site, self.calls[key], value, probe))

    def tensor(self, z: torch.Tensor) -> torch.Tensor:
        probe = torch.zeros_like(z, requires_grad=True)
        self._record(z.detach(), probe)
        return z + probe

    def attn_logits(self, shape: tuple[int, int, int, int], like: torch.Tensor) -> torch.Tensor:
        probe = torch.zeros(shape, dtype=like.dtype, device=like.device, requires_grad=True)
        self._record(None, probe)
        return probe


def capture_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    sites: Sequence[Site],
    *,
    loss: str = "margin",
    input_grad: bool = False,
) -> tuple[torch.Tensor, list[Capture], torch.Tensor | None]:
    """One forward and one backward of ``model`` on ``x``: logits, a :class:`Capture` per site call,
    and (``input_grad=True``) ``dL/dx`` with respect to the [0, 1] image.

    ``y=None`` uses the model's own prediction as the label (what a deployed defense could do).
    Captures come in forward order; values and grads are detached.
    """
    records: list[tuple[Site, int, torch.Tensor | None, torch.Tensor]] = []
    calls: dict[int, int] = {}
    handles = [_Probe(site, records, calls).attach() for site in sites]
    try:
        with torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(input_grad)
            logits = model(x_in)
            labels = logits.argmax(1) if y is None else y.to(logits.device).long()
            total = attacker_loss(logits, labels, loss).sum()
            inputs = [probe for *_, probe in records] + ([x_in] if input_grad else [])
            grads = torch.autograd.grad(total, inputs, allow_unused=True) if inputs else ()
    finally:
        for handle in handles:
            handle.remove()
    captures = [
        Capture(site, call, value, torch.zeros_like(probe) if g is None else g.detach())
        for (site, call, value, probe), g in zip(records, grads, strict=False)
    ]
    x_grad = grads[-1] if input_grad else None
    return logits.detach(), captures, x_grad


def layer_sites(model: nn.Module, layers: Sequence[str]) -> list[Site]:
    """Sites for RFD's per-layer analysis: ``"input"``, ``"penultimate"`` (the head's input) or the
    output of a named module."""
    sites = []
    for layer in layers:
        if layer == "input":
            sites.append(Site("input", "", model, "pre"))
        elif layer == "penultimate":
            name, head = classifier_head(model)
            sites.append(Site("feature", name, head, "pre"))
        else:
            sites += find_sites(model, ["feature"], feature_layers=[layer])["feature"]
    return sites


def default_layers(model: nn.Module) -> list[str]:
    """Hidden layers to analyse when none are named: transformer blocks, ResNet stages, or else the
    output of every activation module, plus the penultimate features when they are not among those."""
    modules = dict(model.named_modules())
    layers: list[str] = []
    for name, module in modules.items():
        if name.split(".")[-1] == "blocks" and isinstance(module, (nn.ModuleList, nn.Sequential)):
            layers = [f"{name}.{i}" for i in range(len(module))]
            break
    if not layers:
        layers = [n for n in modules if n.split(".")[-1] in ("layer1", "layer2", "layer3", "layer4")]
    if not layers:
        layers = [n for n, m in modules.items() if isinstance(m, (nn.ReLU, nn.GELU))]
        head_name, head = classifier_head(model)
        # The last activation often *is* the head input: do not list it twice.
        return layers if layers and _feeds(model, modules[layers[-1]], head) else layers + ["penultimate"]
    return layers + ["penultimate"]


def _feeds(model: nn.Module, module: nn.Module, head: nn.Module) -> bool:
    """Whether ``module``'s output is exactly what ``head`` receives (checked on one forward)."""
    seen: dict[str, torch.Tensor] = {}
    h1 = module.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    h2 = head.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0]))
    try:
        shape = getattr(model, "input_shape", None)
        if shape is None:
            return False
        with torch.no_grad():
            device = next(model.parameters()).device
            model(torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)).to(device))
    finally:
        h1.remove()
        h2.remove()
    out, into = seen.get("out"), seen.get("head")
    return out is not None and into is not None and out.shape == into.shape and torch.equal(out, into)


def middle_layer(model: nn.Module) -> str:
    """The hidden layer in the middle of :func:`default_layers` (where SINAI Fig. 1(c) measures MSE)."""
    layers = [name for name in default_layers(model) if name != "penultimate"]
    if not layers:
        raise ValueError("found no hidden layer to measure at; name one (layer=..., --layer)")
    return layers[(len(layers) - 1) // 2]
