"""BitOPs: the compute cost measure of seed 001 (Tables 1, 2, 4, 6), per layer and per model.

The paper gives no formula; its notes (App. C: "sixteen BitOps = four 4-bit additions = one 4-bit
multiplication") fit ``MACs x weight bits x activation bits`` for a multiply-accumulate and ``bits`` for an
addition. Counted here, for one image:

- every ``nn.Conv*`` / ``nn.Linear``: MACs (output elements x fan-in, measured by forward hooks on one
  dummy input) x ``weight_bits`` x ``act_bits`` (32 x 32 by default: the dense float model);
- a conv with a SINAI-selective branch under a :class:`~sinai.defenses.spec.SelectiveSpec`: the exact part
  is the outputs computed exactly (``ceil((1 - r) * C*H*W)``, or ``(M - N) / M`` of them for N:M) x fan-in x
  ``weight_bits`` x ``act_bits``; the approximation adds, per output position, ``P . Q(x)`` as one addition
  of an ``act_bits(Q)``-bit value per non-zero of P (P is ternary: +-1 entries are additions, its
  sqrt(3/k) scale folds into W~) and ``W~`` as ``n * k`` MACs at ``weight_bits(W~)`` (4) x ``act_bits(Q)``.

Not counted (as in the paper's tables, which count the convolutions' arithmetic): biases, BatchNorm,
activations, pooling, and the top-k / N:M selection's comparisons. The product ``W~ . (P Q(x))`` is
counted at Q(x)'s width although its accumulated input is a few bits wider.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BitOps", "LayerCost", "bitops"]


@dataclass(frozen=True)
class LayerCost:
    """One layer's cost per image: ``macs`` of the dense layer, the BitOPs of its exact part and of its
    approximation (0 without SINAI-selective), and the number of outputs computed exactly."""

    name: str
    kind: str
    macs: int
    outputs: int
    exact_outputs: int
    exact_bitops: int
    approx_bitops: int

    @property
    def bitops(self) -> int:
        """Exact plus approximation BitOPs."""
        return self.exact_bitops + self.approx_bitops


@dataclass(frozen=True)
class BitOps:
    """A model's BitOPs per image: per-layer rows, the total, and the dense model's total at the same
    ``weight_bits`` / ``act_bits`` (the reduction's reference)."""

    layers: tuple[LayerCost, ...]
    weight_bits: int
    act_bits: int
    defense: str

    @property
    def total(self) -> int:
        return sum(layer.bitops for layer in self.layers)

    @property
    def dense_total(self) -> int:
        return sum(layer.macs for layer in self.layers) * self.weight_bits * self.act_bits

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def reduction_percent(self) -> float:
        """100 x (1 - total / dense total): the saving of seed 001's tables (82.6% at r = 0.9 on CIFAR)."""
        return 100.0 * (1.0 - self.total / self.dense_total) if self.dense_total else 0.0

    def rows(self) -> list[dict[str, object]]:
        """JSON-able rows, one per layer."""
        return [
            {
                "layer": c.name,
                "kind": c.kind,
                "macs": c.macs,
                "outputs": c.outputs,
                "exact_outputs": c.exact_outputs,
                "exact_bitops": c.exact_bitops,
                "approx_bitops": c.approx_bitops,
                "bitops": c.bitops,
            }
            for c in self.layers
        ]


def _check_bits(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"{name} must be an integer number of bits in [1, 64], got {value!r}")
    return value


def _selective_spec(defense: object):  # -> SelectiveSpec | None
    from sinai.defenses.spec import Defense, SelectiveSpec, parse_defense

    if defense is None or isinstance(defense, SelectiveSpec):
        return defense
    if isinstance(defense, str):
        defense = parse_defense(defense)
    if not isinstance(defense, Defense):
        raise ValueError(
            f"defense must be a Defense, its text form or a SelectiveSpec, got {type(defense).__name__}"
        )
    return defense.specs.get("approx")


@torch.no_grad()
def bitops(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    defense: object = None,
    weight_bits: int = 32,
    act_bits: int = 32,
) -> BitOps:
    """BitOPs per image of ``model`` (see the module): every conv and linear layer at ``weight_bits`` x
    ``act_bits``, and with a SINAI-selective ``defense`` (a :class:`~sinai.defenses.spec.Defense`, its
    text such as ``"SINAI-selective:ratio=0.9"``, or a ``SelectiveSpec``) the approximated convs at the
    spec's ratio or N:M. A :class:`~sinai.defenses.protect.DefendedModel` brings its own defense.

    ``input_shape`` (C, H, W) defaults to ``model.input_shape``. Other defenses (noise, AAA) cost nothing
    here: only ``approx`` changes the count.
    """
    from sinai.defenses.protect import selected_count
    from sinai.defenses.spec import Defense

    _check_bits("weight_bits", weight_bits)
    _check_bits("act_bits", act_bits)
    if isinstance(getattr(model, "defense", None), Defense) and isinstance(
        getattr(model, "model", None), nn.Module
    ):
        defense = model.defense if defense is None else defense
        model = model.model
    spec = _selective_spec(defense)
    shape = tuple(input_shape or getattr(model, "input_shape", ()) or ())
    if len(shape) != 3:
        raise ValueError(f"bitops needs the input shape (C, H, W) of one image, got {shape or input_shape!r}")
    if spec is not None and not any(
        isinstance(m, nn.Conv2d) and isinstance(getattr(m, "approx", None), nn.Module)
        for m in model.modules()
    ):
        raise ValueError(
            "a SINAI-selective cost needs a model with approximation branches; train one with "
            "`sinai train mnist-cnn --selective`"
        )

    rows: list[LayerCost] = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor, name: str) -> None:
        per_image = out[0]
        outputs = per_image.numel()
        if isinstance(module, nn.Linear):
            kind, fan_in = "linear", module.in_features
        else:
            kind = "conv"
            fan_in = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
        macs = outputs * fan_in
        branch = getattr(module, "approx", None) if isinstance(module, nn.Conv2d) else None
        if spec is None or not isinstance(branch, nn.Module):
            rows.append(LayerCost(name, kind, macs, outputs, outputs, macs * weight_bits * act_bits, 0))
            return
        if spec.m:
            exact = outputs // spec.m * (spec.m - spec.n)
        else:
            exact = selected_count(1.0 - spec.ratio, outputs)
        positions = outputs // module.out_channels
        nonzeros = int((branch.projection != 0).sum())
        a_q = branch.act_bits
        approx = positions * (nonzeros * a_q + branch.n * branch.k * branch.weight_bits * a_q)
        rows.append(
            LayerCost(
                name, "conv+approx", macs, outputs, exact, exact * fan_in * weight_bits * act_bits, approx
            )
        )

    handles = [
        m.register_forward_hook(lambda mod, a, o, name=n: hook(mod, a, o, name))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))
    ]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros((1, *shape), device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    name = "dense" if spec is None else f"SINAI-selective {spec.describe()}"
    return BitOps(tuple(rows), weight_bits, act_bits, name)
