"""RFD's Theorem 1 checked on a model (RFD sections 3.3-3.5, Figure 1, Tables 6 and 14).

Model ``f = g o h`` with Gaussian noise of std ``s`` on the output of layer ``h``; the attacker probes
``x + u`` with ``u ~ N(0, p^2 I)``. RFD writes the variances as ``nu = s^2`` and ``mu = p^2``; here
both are standard deviations (``std``, ``probe_std``), like everywhere in sinai. Theorem 1: to first
order the attacker sees the wrong sign of ``L(x + u) - L(x)`` with probability

    P = 1/2 - arctan(R^-1/2) / pi,   R = 2 s^2 ||grad_h (L o g)||^2 / (p^2 ||grad_x (L o f)||^2),

a Cauchy tail (the ratio of two independent zero-mean normals). This module measures the gradient
ratio on clean images and after one adversarial gradient step (Figure 1), compares the predicted P with
the flip rate measured with the real defense (``protect`` with feature/input noise) over random
directions, and sweeps the noised layer (Tables 6 and 14).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..defenses import Defense, NoiseSpec, protect
from ..evaluation.clean import clean_accuracy
from .common import RobustCheck, Row, calibrate_std, check_stds, noisy_accuracy
from .probes import attacker_loss, capture_gradients, layer_sites


def layer_defense(layer: str, std: float) -> Defense:
    """Noise of ``std`` at one layer: ``"input"`` (RND), ``"penultimate"`` (FND's default) or the output
    of a named module (FND at that layer)."""
    check_stds([std])
    if layer == "input":
        return Defense({"input": NoiseSpec(std=std)}, name="RND")
    if layer == "penultimate":
        return Defense({"feature": NoiseSpec(std=std)}, name="FND")
    return Defense({"feature": NoiseSpec(std=std, layers=(layer,))}, name="FND")


@dataclass(frozen=True)
class GradientRatio(Row):
    """One image at one layer: ``||grad_h L||``, ``||grad_x L||`` and the squared ratio, on the clean
    image and after one adversarial step (``inf`` where ``||grad_x L||`` is zero)."""

    model: str
    layer: str
    image: int
    grad_h: float
    grad_x: float
    ratio_clean: float
    grad_h_adv: float
    grad_x_adv: float
    ratio_adv: float


@dataclass(frozen=True)
class FlipRate(Row):
    """One image: Theorem 1's ratio and predicted probability of a wrong decision, the measured rate, and
    the mean / std of the clean loss differences (a shift the theorem assumes away)."""

    model: str
    layer: str
    image: int
    std: float
    probe_std: float
    theorem_ratio: float
    predicted: float
    measured: float
    clean_diff_shift: float


@dataclass(frozen=True)
class LayerRow(Row):
    """Noise at one layer (RFD Tables 6 / 14): clean and robust accuracy with the fixed std and with the
    std calibrated to the clean drop (``robust_*`` is ``None`` when no attack was run), the mean gradient
    norm at the layer and the median gradient-ratio change (``None`` when no ratio was finite)."""

    model: str
    layer: str
    base_clean: float
    std_fixed: float
    clean_fixed: float
    robust_fixed: float | None
    std_calibrated: float
    clean_calibrated: float
    robust_calibrated: float | None
    grad_norm_mean: float
    ratio_change_median: float | None


def predicted_flip(ratio: torch.Tensor | float) -> torch.Tensor:
    """Theorem 1's probability of a wrong decision for the Theorem's ratio ``R`` (0 -> 0, inf -> 1/2)."""
    r = torch.as_tensor(ratio, dtype=torch.float64)
    return torch.where(r > 0, 0.5 - torch.atan(r.clamp_min(1e-300).rsqrt()) / math.pi, torch.zeros_like(r))


def _grad_norms(model, x, y, sites, loss, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    """``||grad_h L||^2`` per (site, image) and ``||grad_x L||^2`` per image, summed over site calls."""
    device = next(model.parameters()).device
    gh, gx = [], []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        _, captures, g = capture_gradients(model, xb, yb, sites, loss=loss, input_grad=True)
        norms = torch.zeros(len(sites), len(xb), dtype=torch.float64)
        for c in captures:
            j = next(k for k, s in enumerate(sites) if s is c.site)
            norms[j] += c.grad.flatten(1).double().pow(2).sum(1).cpu()
        gh.append(norms)
        gx.append(g.flatten(1).double().pow(2).sum(1).cpu())
    return torch.cat(gh, 1), torch.cat(gx)


def gradient_ratios(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: Sequence[str],
    *,
    step: float = 0.05,
    loss: str = "margin",
    batch_size: int = 100,
    name: str | None = None,
) -> list[GradientRatio]:
    """Per layer and image: ``||grad_h L||``, ``||grad_x L||`` and their squared ratio on the clean image
    and after one signed gradient step of size ``step`` (linf) that lowers the margin (RFD Figure 1)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    name = name or getattr(model, "name", type(model).__name__)
    sites = layer_sites(model, layers)
    device = next(model.parameters()).device
    steps = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        _, _, g = capture_gradients(model, xb, y[i : i + batch_size], [], loss=loss, input_grad=True)
        steps.append((xb - step * g.sign()).clamp(0, 1).cpu())
    x_adv = torch.cat(steps)
    gh, gx = _grad_norms(model, x, y, sites, loss, batch_size)
    gh_adv, gx_adv = _grad_norms(model, x_adv, y, sites, loss, batch_size)
    rows = []
    for j, layer in enumerate(layers):
        for i in range(len(x)):
            rows.append(
                GradientRatio(
                    name,
                    layer,
                    i,
                    math.sqrt(gh[j, i]),
                    math.sqrt(gx[i]),
                    float(gh[j, i] / gx[i]) if gx[i] > 0 else math.inf,
                    math.sqrt(gh_adv[j, i]),
                    math.sqrt(gx_adv[i]),
                    float(gh_adv[j, i] / gx_adv[i]) if gx_adv[i] > 0 else math.inf,
                )
            )
    return rows


@torch.no_grad()
def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, batch_size: int) -> torch.Tensor:
    out = [
        attacker_loss(model(x[i : i + batch_size]), y[i : i + batch_size], loss).double()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out)


def flip_rates(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layer: str,
    *,
    std: float,
    probe_std: float,
    directions: int = 64,
    seed: int = 0,
    loss: str = "margin",
    batch_size: int = 512,
    name: str | None = None,
) -> list[FlipRate]:
    """Per image: Theorem 1's predicted probability of a wrong decision and the measured rate.

    Measured: for ``directions`` random ``u ~ N(0, probe_std^2 I)`` (not clipped to the pixel box, as in
    the theorem), the share for which ``L(f_rand(x + u)) - L(f_rand(x))`` (two independent noisy
    forwards of the defended model) has the other sign than ``L(f(x + u)) - L(f(x))``.
    """
    check_stds([std])
    if not probe_std > 0:
        raise ValueError(f"probe_std must be > 0, got {probe_std!r}")
    if directions < 1:
        raise ValueError(f"directions must be >= 1, got {directions!r}")
    name = name or getattr(model, "name", type(model).__name__)
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device).long()
    gh, gx = _grad_norms(model, x, y, layer_sites(model, [layer]), loss, batch_size)
    theorem = 2 * std**2 * gh[0] / (probe_std**2 * gx.clamp_min(1e-300))
    predicted = predicted_flip(theorem)
    gen = torch.Generator(device=device).manual_seed(seed)
    xs = x.repeat_interleave(directions, 0)
    ys = y.repeat_interleave(directions, 0)
    u = torch.randn(xs.shape, generator=gen, device=device, dtype=xs.dtype) * probe_std
    clean_diff = _losses(model, xs + u, ys, loss, batch_size) - _losses(
        model, x, y, loss, batch_size
    ).repeat_interleave(directions)
    # The defense's noise stream must be independent of the directions: a shared seed would make the
    # first noise draw a multiple of u (input noise would then be fully correlated with the probe).
    with protect(model, layer_defense(layer, std), seed=seed + 1_000_003, validate=False) as defended:
        noisy_diff = _losses(defended, xs + u, ys, loss, batch_size) - _losses(
            defended, xs, ys, loss, batch_size
        )
    flips = (torch.sign(noisy_diff) != torch.sign(clean_diff)).double().view(len(x), directions)
    # The theorem takes L(x + u) - L(x) to be zero-mean (first order); a systematic shift (curvature,
    # a change of the runner-up class) makes the attacker's signs more reliable than predicted.
    diffs = clean_diff.view(len(x), directions)
    shift = diffs.mean(1) / diffs.std(1).clamp_min(1e-300) if directions > 1 else torch.zeros(len(x))
    return [
        FlipRate(
            name,
            layer,
            i,
            std,
            probe_std,
            float(theorem[i]),
            float(predicted[i]),
            float(flips[i].mean()),
            float(shift[i]),
        )
        for i in range(len(x))
    ]


def layer_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: Sequence[str],
    *,
    std: float,
    drop: float = 0.04,
    passes: int = 3,
    seed: int = 0,
    ratios: Sequence[GradientRatio] | None = None,
    robust: RobustCheck | None = None,
    name: str | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[LayerRow]:
    """Noise at one layer at a time (RFD Tables 6 and 14): with the fixed ``std`` (clean and robust
    accuracy, mean ``||grad_h L||``) and with the std calibrated to a ``drop`` in clean accuracy (robust
    accuracy and the median change of the gradient ratio after one adversarial step, from ``ratios``,
    the rows of :func:`gradient_ratios`; computed here when not given)."""
    check_stds([std])
    name = name or getattr(model, "name", type(model).__name__)
    if ratios is None:
        ratios = gradient_ratios(model, x, y, layers, name=name)
    base = clean_accuracy(model, x, y, passes=1).mean
    rows = []
    for layer in layers:
        sel = [r for r in ratios if r.layer == layer]
        changes = torch.tensor(
            [r.ratio_adv / r.ratio_clean for r in sel if 0 < r.ratio_clean < math.inf], dtype=torch.float64
        )

        def acc(s: float, layer: str = layer) -> float:
            with protect(model, layer_defense(layer, s), seed=seed) as defended:
                return noisy_accuracy(defended, x, y, passes=1)

        calibrated = calibrate_std(acc, base, drop)
        measured = {}
        for tag, s in (("fixed", std), ("calibrated", calibrated)):
            with protect(model, layer_defense(layer, s), seed=seed) as defended:
                clean = clean_accuracy(defended, x, y, passes=passes).mean
            rob = robust(model, layer_defense(layer, s), seed=seed) if robust is not None else None
            measured[tag] = (s, clean, rob)
        rows.append(
            LayerRow(
                name,
                layer,
                base,
                *measured["fixed"],
                *measured["calibrated"],
                sum(r.grad_h for r in sel) / max(len(sel), 1),
                float(changes.median()) if len(changes) else None,
            )
        )
        if on_step:
            on_step()
    return rows
