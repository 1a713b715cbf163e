"""SINAI-selective (seed 001): a learned, INT4-quantised low-rank approximation of every convolution.

Paper: "SINAI: Selective Injection of Noise for Adversarial Robustness with Improved Efficiency" (seed 001),
Sec. 3.1 (Alg. 1, Eq. 1), Sec. 3.2 (Eq. 2), App. D (training). Each ``nn.Conv2d`` gets an
:class:`ApproxBranch`, attached as its child module ``approx`` (so its parameters are in the state dict)::

    z~ = W~_Q . P . Q(x) + b~_Q        per patch x in R^d, d = C_in * kh * kw (the conv's unfold)

- ``P`` (k x d) is a fixed sparse random projection, sqrt(3/k) * {-1, 0, +1} with probabilities
  1/6, 2/3, 1/6 (Achlioptas 2001), drawn once from a seed and stored as a buffer (E[P^T P] = I);
- ``W~`` (n x k, n = C_out) and ``b~`` (n) are trained and fake-quantised to INT4 with a straight-through
  estimator: ``W~`` per output channel (symmetric, scale max|row| / 7: at most 15 values per row), ``b~``
  per tensor (the same grid, one scale);
- ``Q(x)`` fake-quantises the conv's input to ``act_bits`` (8 by default: INT4 weights x INT8 activations)
  per sample, symmetric, scale max|x| / (2^(bits-1) - 1), so a sample's result never depends on the batch
  it is in. The paper names Q but gives no width; its hardware (App. C) has 4-bit multipliers that also
  do 16-bit products; ``act_bits=4`` is the all-4-bit reading.

``P . Q(x)`` over all patches is a convolution of ``Q(x)`` with ``P`` seen as k filters of the conv's
shape (same stride, padding, dilation), and ``W~`` is then a 1x1 convolution: the same numbers as the
unfold form, without materialising the patches. The conv module itself is untouched, so calling the
model computes the exact network; only :func:`mixed_forward` (training) and the ``approx`` site of
:func:`sinai.defenses.protect` (inference, ``SINAI-selective``) use the branches.

Training (Alg. 1), :class:`SelectiveTraining`: copy the base model (the adversarially trained CNN, as in the
paper), distil ``W~, b~`` by MSE between ``z`` and ``z~`` with the base frozen (full precision: the notes'
reading of the paper's "one-time" INT4 step), then fine-tune every weight with
``CE(mixed forward at ratio) + mse_weight * MSE`` with quantisation on (STE). Readings where the paper is
silent: ``W~`` starts at ``W P^T`` (the Johnson-Lindenstrauss estimate the paper's Sec. 3.3 argues from,
so that ``z~ ~ z`` before any step); the MSE is the mean over output elements (per layer, then averaged
over layers), not the per-sample sum of Eq. 1, whose scale grows with the layer size and would swamp the
cross-entropy at weight 0.1; ``k`` is not given: ``d/4`` per layer by default; BatchNorm keeps the
base's running statistics during fine-tuning (Alg. 1 updates W, b, W~, b~; see
:meth:`SelectiveTraining.loss`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "APPROX_ATTR",
    "ApproxBranch",
    "SelectiveTraining",
    "approx_convs",
    "attach_branches",
    "distil",
    "fake_quant_activation",
    "fake_quant_weight",
    "layer_mse",
    "mixed_forward",
]

#: The attribute (child module name) under which a conv carries its approximation branch.
APPROX_ATTR = "approx"

#: Ratios ``finish`` reports accuracy and BitOPs at (seed 001 Tables 1 and 6; the issue's sweep).
REPORT_RATIOS = (0.5, 0.8, 0.9, 0.99)


def _round_ste(t: torch.Tensor) -> torch.Tensor:
    """``round(t)`` forward, identity backward (straight-through estimator)."""
    return t + (torch.round(t) - t).detach()


def fake_quant_weight(
    w: torch.Tensor, bits: int = 4, *, per_row: bool = True, ste: bool = True
) -> torch.Tensor:
    """Symmetric fake quantisation of ``w`` to signed ``bits``-bit integers times a scale.

    ``per_row``: one scale per output channel (row 0 of ``w``), max|row| / (2^(bits-1) - 1); otherwise one
    scale for the whole tensor. Values lie on ``{-q, ..., q} * scale`` (q = 7 for INT4): at most 2q + 1
    distinct values per row. ``ste``: the gradient passes the rounding as the identity.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = (
        w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
        if per_row
        else w.detach().abs().max()
    )
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scaled = w / scale
    q = (_round_ste(scaled) if ste else torch.round(scaled)).clamp(-qmax, qmax)
    return q * scale


def fake_quant_activation(x: torch.Tensor, bits: int = 8, *, ste: bool = True) -> torch.Tensor:
    """Q(x): symmetric per-sample fake quantisation of a batch to ``bits`` bits (scale max|x_i| / q).

    Per sample so that an image's value does not depend on the batch it is in. Without ``ste`` the
    rounding has a zero gradient and only the scale's (through max|x_i|) remains: what autograd gives,
    the naive white-box gradient.
    """
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    scaled = x / scale
    return (_round_ste(scaled) if ste else torch.round(scaled)) * scale


def _check_bits(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
        raise ValueError(f"{name} must be an integer number of bits in [2, 16], got {value!r}")
    return value


class ApproxBranch(nn.Module):
    """The approximation ``z~ = W~_Q P Q(x) + b~_Q`` of one ``nn.Conv2d`` (seed 001 Sec. 3.1).

    Built from the conv (its geometry is copied, the conv is not referenced): ``projection`` is P (k x d,
    a buffer), ``weight`` W~ (n x k) and ``bias`` b~ (n) the trainable parameters. ``quantize`` (not saved)
    switches the INT4 / Q(x) fake quantisation off for distillation (:func:`distil`).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        *,
        k: int,
        generator: torch.Generator,
        weight_bits: int = 4,
        act_bits: int = 8,
    ) -> None:
        super().__init__()
        d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
            raise ValueError(
                f"k must be an integer in [1, d] = [1, {d}] (d = C_in*kh*kw of the conv), got {k!r}"
            )
        self.in_channels, self.kernel_size = conv.in_channels, tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.k, self.d, self.n = k, d, conv.out_channels
        self.weight_bits = _check_bits("weight_bits", weight_bits)
        self.act_bits = _check_bits("act_bits", act_bits)
        self.quantize = True
        # Achlioptas' sparse projection: +1 w.p. 1/6, -1 w.p. 1/6, 0 w.p. 2/3, scaled by sqrt(3/k).
        u = torch.rand((k, d), generator=generator, dtype=torch.float64)
        signs = (u < 1 / 6).double() - (u > 5 / 6).double()
        self.register_buffer("projection", (signs * math.sqrt(3.0 / k)).float())
        dtype = conv.weight.dtype
        self.weight = nn.Parameter(torch.zeros((self.n, k), dtype=dtype, device=conv.weight.device))
        self.bias = nn.Parameter(torch.zeros(self.n, dtype=dtype, device=conv.weight.device))
        self.to(conv.weight.device)

    def init_from(self, conv: nn.Conv2d) -> None:
        """Start at the Johnson-Lindenstrauss estimate ``W~ = W P^T``, ``b~ = b`` (so ``z~ ~ z``)."""
        with torch.no_grad():
            self.weight.copy_(conv.weight.reshape(self.n, self.d) @ self.projection.T)
            self.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(self.bias))

    def quantized_weight(self, *, ste: bool = True) -> torch.Tensor:
        """W~_Q: INT4 per output channel (or W~ when quantisation is off)."""
        return fake_quant_weight(self.weight, self.weight_bits, ste=ste) if self.quantize else self.weight

    def quantized_bias(self, *, ste: bool = True) -> torch.Tensor:
        """b~_Q: INT4 with one scale (or b~ when quantisation is off)."""
        return (
            fake_quant_weight(self.bias, self.weight_bits, per_row=False, ste=ste)
            if self.quantize
            else self.bias
        )

    def project(self, x: torch.Tensor, *, ste: bool = True) -> torch.Tensor:
        """P . Q(x) at every output position: (B, k, H', W')."""
        xq = fake_quant_activation(x, self.act_bits, ste=ste) if self.quantize else x
        kernel = self.projection.to(xq.dtype).view(self.k, self.in_channels, *self.kernel_size)
        return F.conv2d(xq, kernel, None, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor, *, ste: bool = True) -> torch.Tensor:
        """z~ for the conv's input ``x``: (B, n, H', W'). ``ste=False``: Q's rounding has a zero gradient."""
        w = self.quantized_weight().to(x.dtype).view(self.n, self.k, 1, 1)
        return F.conv2d(self.project(x, ste=ste), w, self.quantized_bias().to(x.dtype))

    @torch.no_grad()
    def freeze_quantized(self) -> None:
        """Store W~_Q and b~_Q in the parameters themselves (idempotent: quantising them again is exact)."""
        if self.quantize:
            self.weight.copy_(self.quantized_weight(ste=False))
            self.bias.copy_(self.quantized_bias(ste=False))

    def extra_repr(self) -> str:
        return f"d={self.d}, k={self.k}, n={self.n}, W~ INT{self.weight_bits}, Q(x) {self.act_bits}-bit"


def approx_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The ``(name, conv)`` pairs of ``model`` that carry an :class:`ApproxBranch`, in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and isinstance(getattr(m, APPROX_ATTR, None), ApproxBranch)
    ]


def layer_k(d: int, k: int | float | None) -> int:
    """k for a layer of patch size ``d``: ``None`` = round(d/4), a float in (0, 1] = round(k*d), an int = k
    (all at least 1). ``ValueError`` when the result is outside [1, d]."""
    if k is None:
        k = 0.25
    value = k if isinstance(k, int) else max(1, math.floor(k * d + 0.5))
    if not 1 <= value <= d:
        raise ValueError(f"k={k!r} is outside [1, d] for a conv with d = C_in*kh*kw = {d}; use k <= {d}")
    return value


def attach_branches(
    model: nn.Module, *, k: int | float | None = None, seed: int = 0, weight_bits: int = 4, act_bits: int = 8
) -> list[tuple[str, nn.Conv2d]]:
    """Give every ``nn.Conv2d`` of ``model`` an :class:`ApproxBranch` (child ``approx``); P is drawn from a
    generator seeded with ``seed``, layer by layer in module order. Returns the convs.

    ``ValueError`` when the model has no convolution, or a conv is grouped or pads other than with zeros.
    """
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            f"SINAI-selective approximates convolutions, but {getattr(model, 'name', type(model).__name__)} "
            "has no nn.Conv2d; train it on a CNN such as mnist-cnn"
        )
    gen = torch.Generator().manual_seed(seed)
    for name, conv in convs:
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(
                f"conv {name!r} has groups={conv.groups}, padding_mode={conv.padding_mode!r}; "
                "SINAI-selective supports ungrouped convs with zero padding"
            )
        d = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        branch = ApproxBranch(
            conv, k=layer_k(d, k), generator=gen, weight_bits=weight_bits, act_bits=act_bits
        )
        setattr(conv, APPROX_ATTR, branch)
    return convs


@contextmanager
def _quantization(model: nn.Module, on: bool) -> Iterator[None]:
    branches = [getattr(c, APPROX_ATTR) for _, c in approx_convs(model)]
    before = [b.quantize for b in branches]
    for b in branches:
        b.quantize = on
    try:
        yield
    finally:
        for b, q in zip(branches, before, strict=True):
            b.quantize = q


@contextmanager
def _frozen_batchnorm(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in eval mode (running statistics used, not updated) while open."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


@contextmanager
def _captured(model: nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While open, each forward of ``model`` records (input, output) of every approximated conv."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, conv in approx_convs(model):

        def hook(module: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> None:
            seen[name] = (args[0], out)

        handles.append(conv.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextmanager
def mixed_forward(
    model: nn.Module, ratio: float, *, ste: bool = True, n: int = 0, m: int = 0
) -> Iterator[list[torch.Tensor]]:
    """While open, every approximated conv of ``model`` outputs Eq. 2's mix ``z m + z~ (1 - m)`` (the top
    ``1 - ratio`` of each sample's outputs by z~ exact, or N:M) and appends its MSE(z~, z) (a scalar with
    gradient to W, b, W~, b~) to the yielded list: the forward of Alg. 1's fine-tuning."""
    from sinai.defenses.selective import exact_mask

    mses: list[torch.Tensor] = []
    handles = []

    def hook(module: nn.Module, args: tuple, z: torch.Tensor) -> torch.Tensor:
        approx = getattr(module, APPROX_ATTR)(args[0], ste=ste)
        mses.append(F.mse_loss(approx, z))
        return torch.where(exact_mask(approx.detach(), ratio, n=n, m=m), z, approx)

    for _, conv in approx_convs(model):
        handles.append(conv.register_forward_hook(hook))
    try:
        yield mses
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_mse(model: nn.Module, x: torch.Tensor, *, batch_size: int = 500) -> dict[str, dict[str, float]]:
    """Per approximated conv, on images ``x`` through the exact network: the MSE between z and z~ (the
    branch as deployed) and that MSE relative to the mean of z^2 (0 = exact, 1 = as bad as z~ = 0)."""
    sums: dict[str, list[float]] = {}
    branch = {name: getattr(c, APPROX_ATTR) for name, c in approx_convs(model)}
    with _captured(model) as seen:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
            for name, (inp, z) in seen.items():
                approx = branch[name](inp)
                acc = sums.setdefault(name, [0.0, 0.0, 0])
                acc[0] += float(((approx - z) ** 2).sum())
                acc[1] += float((z**2).sum())
                acc[2] += z.numel()
    return {name: {"mse": s / n, "relative": s / max(p, 1e-30)} for name, (s, p, n) in sums.items()}


def distil(
    model: nn.Module,
    x: torch.Tensor,
    *,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Distil every branch of ``model`` (Eq. 1): Adam on the mean squared error between the frozen exact
    conv output z and z~, on the conv inputs of the exact network for images ``x``; quantisation off.

    The model is in eval mode throughout (BatchNorm running statistics; the trunk gets no gradient) and its
    training flag is restored. Returns, per epoch, the mean MSE of each layer over the epoch.
    """
    from tqdm.auto import tqdm

    convs = approx_convs(model)
    if not convs:
        raise ValueError("the model has no approximation branches to distil; attach them first")
    params = [p for _, c in convs for p in getattr(c, APPROX_ATTR).parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    history: list[dict[str, float]] = []
    bar = tqdm(total=steps, desc="distilling W~, b~", unit="step", disable=not progress, mininterval=0.5)
    try:
        with _quantization(model, False), _captured(model) as seen:
            branch = {name: getattr(c, APPROX_ATTR) for name, c in convs}
            for _ in range(epochs):
                totals = dict.fromkeys(branch, 0.0)
                batches = 0
                order = torch.randperm(len(x), generator=gen).to(x.device)
                for i in range(0, len(x), batch_size):
                    with torch.no_grad():
                        model(x[order[i : i + batch_size]])
                    losses = {name: F.mse_loss(branch[name](inp), z) for name, (inp, z) in seen.items()}
                    opt.zero_grad(set_to_none=True)
                    torch.stack(list(losses.values())).sum().backward()
                    opt.step()
                    sched.step()
                    for name, loss in losses.items():
                        totals[name] += loss.item()
                    batches += 1
                    bar.update()
                history.append({name: total / batches for name, total in totals.items()})
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
        model.train(was_training)
    return history


def _check_int(name: str, value: object, low: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"SINAI-selective {name} must be an integer >= {low} ({meaning}), got {value!r}")
    return value


def _check_float(name: str, value: object, meaning: str, *, low: float, high: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= low or (high is not None and value >= high):
        bound = f"in ({low:g}, {high:g})" if high is not None else f"> {low:g}"
        raise ValueError(f"SINAI-selective {name} must be a number {bound} ({meaning}), got {value!r}")
    return float(value)


_OPTION_TYPES = {
    "base": str,
    "k": "k",
    "ratio": float,
    "distill_epochs": int,
    "distill_lr": float,
    "mse_weight": float,
    "weight_bits": int,
    "act_bits": int,
    "seed": int,
}


@dataclass(frozen=True)
class SelectiveTraining:
    """SINAI-selective training (seed 001 Alg. 1), a training method of an embedded model's recipe.

    ``base``: the embedded model whose weights are the starting point (the adversarially trained CNN, as
    in the paper, App. D). ``k``: the projection's dimension per conv: ``None`` = round(d/4), an int for
    every layer, or a float in (0, 1] as a fraction of d (the paper gives none). ``ratio``: share of each
    sample's conv outputs approximated in the fine-tuning's mixed forward (0.9, the paper's CIFAR value).
    ``distill_epochs`` / ``distill_lr``: Adam distillation of W~, b~ (the paper: 50 epochs of momentum
    SGD on CIFAR). ``mse_weight``: the MSE term of the fine-tuning loss (0.1, Alg. 1). ``weight_bits``:
    W~, b~ (INT4); ``act_bits``: Q(x). ``seed``: draws P. Fine-tuning's epochs and lr are the recipe's
    (the paper fine-tunes 1 epoch).
    """

    base: str = "mnist-cnn-at"
    k: int | float | None = None
    ratio: float = 0.9
    distill_epochs: int = 5
    distill_lr: float = 3e-3
    mse_weight: float = 0.1
    weight_bits: int = 4
    act_bits: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise ValueError(f"SINAI-selective base must be an embedded model name, got {self.base!r}")
        k = self.k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, (int, float)):
                raise ValueError(
                    f"SINAI-selective k must be None (d/4), an int >= 1 or a fraction in (0, 1], got {k!r}"
                )
            if isinstance(k, float) and k.is_integer() and k > 1:
                k = int(k)
            if isinstance(k, int) and k < 1 or isinstance(k, float) and not 0 < k <= 1:
                raise ValueError(
                    f"SINAI-selective k must be an int >= 1 (dimensions) or a fraction of d in (0, 1], "
                    f"got {k!r}"
                )
            object.__setattr__(self, "k", k)
        object.__setattr__(
            self,
            "ratio",
            _check_float("ratio", self.ratio, "share of conv outputs approximated", low=0, high=1),
        )
        _check_int("distill_epochs", self.distill_epochs, 0, "epochs of MSE distillation")
        object.__setattr__(
            self, "distill_lr", _check_float("distill_lr", self.distill_lr, "Adam's lr", low=0)
        )
        mse = self.mse_weight
        if isinstance(mse, bool) or not isinstance(mse, (int, float)) or not math.isfinite(mse) or mse < 0:
            raise ValueError(f"SINAI-selective mse_weight must be a number >= 0 (Alg. 1: 0.1), got {mse!r}")
        object.__setattr__(self, "mse_weight", float(mse))
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        _check_int("seed", self.seed, 0, "draws the projection P")

    # ------------------------------------------------------------------ the TrainingMethod protocol
    def key(self) -> dict:
        """Everything that changes the weights (JSON-able; enters the cache hash)."""
        return {"method": "sinai-selective", **asdict(self)}

    def options(self, default: SelectiveTraining) -> str:
        """``k=8,ratio=0.8``: the fields that differ from ``default`` ('' if none)."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                shown = "none" if value is None else f"{value:g}" if isinstance(value, float) else value
                parts.append(f"{f.name}={shown}")
        return ",".join(parts)

    @classmethod
    def parse_options(cls, text: str) -> dict:
        """``"k=8,ratio=0.8"`` -> ``{"k": 8, "ratio": 0.8}``; ``ValueError`` (one line) for a bad item."""
        found: dict[str, object] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key not in _OPTION_TYPES:
                raise ValueError(
                    f"expected options of SINAI-selective ({', '.join(_OPTION_TYPES)}) as key=value, "
                    f"got {item!r}"
                )
            if key in found:
                raise ValueError(f"option {key!r} given twice in {text!r}")
            kind = _OPTION_TYPES[key]
            try:
                if kind == "k":
                    found[key] = (
                        None
                        if value.lower() in ("none", "d/4")
                        else (int(value) if value.lstrip("+").isdigit() else float(value))
                    )
                else:
                    found[key] = kind(value)
            except ValueError:
                what = {int: "an integer", float: "a number", "k": "an integer or a fraction of d"}.get(
                    kind, "text"
                )
                raise ValueError(f"SINAI-selective {key} must be {what}, got {value!r}") from None
        if not found:
            raise ValueError(f"no options after ':' (expected e.g. k=8,ratio=0.8), got {text!r}")
        return found

    def describe(self) -> str:
        """E.g. ``SINAI-selective from mnist-cnn-at (k=d/4, ratio 0.9, W~ INT4, Q(x) 8-bit, MSE x0.1)``."""
        k = "d/4" if self.k is None else (f"{self.k:g}d" if isinstance(self.k, float) else str(self.k))
        return (
            f"SINAI-selective from {self.base} (k={k}, ratio {self.ratio:g}, W~ INT{self.weight_bits}, "
            f"Q(x) {self.act_bits}-bit, MSE x{self.mse_weight:g})"
        )

    def attach(self, model: nn.Module) -> None:
        """Give every conv of ``model`` its approximation branch (P drawn from ``seed``)."""
        attach_branches(model, k=self.k, seed=self.seed, weight_bits=self.weight_bits, act_bits=self.act_bits)

    def load_base(
        self,
        model: nn.Module,
        *,
        device: torch.device | str = "cpu",
        progress: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> dict:
        """Copy the weights of :attr:`base` (loaded from the cache, trained once if missing) into ``model``
        and start every branch at ``W P^T``; returns the base's stored metrics (``{}`` if none)."""
        from sinai.models.embedded import embedded_metrics, load_embedded

        base = load_embedded(self.base, device=device, progress=progress, cache_dir=cache_dir)
        copy_base(model, base)
        return embedded_metrics(self.base, cache_dir=cache_dir) or {}

    def prepare(self, model: nn.Module, data: object, *, device: torch.device | str, progress: bool) -> dict:
        """Alg. 1's starting point: the base model's weights, then W~, b~ distilled by MSE (base frozen)."""
        cache_dir = getattr(data, "cache_dir", None)
        base_metrics = self.load_base(model, device=device, progress=progress, cache_dir=cache_dir)
        start = time.perf_counter()
        history = distil(
            model,
            data.x_train,
            epochs=self.distill_epochs,
            lr=self.distill_lr,
            seed=self.seed,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        return {
            "base": self.base,
            "base_test_accuracy": base_metrics.get("test_accuracy"),
            "distill_seconds": round(seconds, 2),
            "distill_mse_first_epoch": history[0] if history else {},
            "distill_mse_last_epoch": history[-1] if history else {},
        }

    def loss(
        self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Alg. 1's loss: CE of the mixed forward at ``ratio`` + ``mse_weight`` x the mean layer MSE, with
        W~, b~ and Q(x) fake-quantised (STE); gradients reach W, b, W~, b~ (and every other weight).

        BatchNorm normalises with the base's running statistics, which stay as they are (Alg. 1 updates
        W, b, W~, b~; the deployed model at every ratio and its exact network share one set of statistics,
        so re-estimating them on the mixed forward at one ratio would shift the others: on mnist-cnn-at
        that cost the exact network 8 points of PGD-20 accuracy, 97 -> 88.5%, against 97 -> 93% frozen).
        """
        with mixed_forward(model, self.ratio, ste=True) as mses, _frozen_batchnorm(model):
            logits = model(xb)
        ce = F.cross_entropy(logits, yb)
        mse = torch.stack(mses).mean()
        return ce + self.mse_weight * mse, {"ce": ce.item(), "mse": mse.item()}

    @torch.no_grad()
    def finish(self, model: nn.Module, data: object) -> dict:
        """Store W~_Q, b~_Q on their INT4 grid, then measure: the per-layer MSE on the test images, clean
        accuracy of the exact network and of the defense at r = 0.5 / 0.8 / 0.9 / 0.99, and BitOPs."""
        from sinai.analysis.bitops import bitops
        from sinai.defenses import protect
        from sinai.defenses.spec import Defense, SelectiveSpec

        model.eval()
        for _, conv in approx_convs(model):
            getattr(conv, APPROX_ATTR).freeze_quantized()
        x, y = data.x_test, data.y_test
        shape = tuple(x.shape[1:])

        def accuracy(net: nn.Module) -> float:
            hits = sum(
                int((net(x[i : i + 500]).argmax(1) == y[i : i + 500]).sum()) for i in range(0, len(y), 500)
            )
            return hits / max(len(y), 1)

        dense = bitops(model, shape)
        per_ratio = {}
        for r in REPORT_RATIOS:
            defense = Defense({"approx": SelectiveSpec(ratio=r)}, name="SINAI-selective")
            with protect(model, defense) as defended:
                acc = accuracy(defended)
            cost = bitops(model, shape, defense=defense)
            per_ratio[f"{r:g}"] = {
                "clean_accuracy": acc,
                "bitops": cost.total,
                "bitops_reduction_percent": round(cost.reduction_percent, 2),
            }
        return {
            "selective": self.key(),
            "layers": {
                name: {"k": getattr(c, APPROX_ATTR).k, "d": getattr(c, APPROX_ATTR).d}
                for name, c in approx_convs(model)
            },
            "final_mse": layer_mse(model, x),
            "exact_test_accuracy": accuracy(model),
            "selective_test_accuracy": per_ratio,
            "dense_bitops": dense.total,
        }


def copy_base(model: nn.Module, base: nn.Module) -> None:
    """Load ``base``'s state dict into ``model`` (same architecture plus branches) and start each branch at
    ``W P^T``. ``ValueError`` when the architectures differ."""
    state = base.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    stray = [key for key in missing if f".{APPROX_ATTR}." not in f".{key}"]
    if stray or unexpected:
        raise ValueError(
            f"the base model's weights do not fit this model (missing {stray[:3]}, "
            f"unexpected {unexpected[:3]}); "
            "SINAI-selective fine-tunes a base of the same architecture"
        )
    for _, conv in approx_convs(model):
        getattr(conv, APPROX_ATTR).init_from(conv)
