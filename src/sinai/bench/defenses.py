"""Defense overhead: protected-forward time / unprotected-forward time, measured in one run.

Every timing of a preset is paired with a timing of the unprotected model taken just before it, on
the same model and batch, and the pair order alternates between rounds; each ratio is the median over
rounds of (preset time / its paired unprotected time), so drifts of the machine cancel.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..defenses import Defense, parse_defense, protect
from .precision import FLOAT32, Precision

BENCH_PRESETS: tuple[str, ...] = ("RND", "FND", "SINAI-Attn", "SINAI-FFN", "SINAI", "SINAI@threshold")
"""``SINAI@threshold`` is SINAI with per-site thresholds calibrated once instead of a per-sample selection."""


@dataclass(frozen=True)
class OverheadRow:
    model: str
    batch: int
    defense: str
    sites: int
    clean_ms: float
    defended_ms: float
    ratio: float


def bench_defense(name: str) -> Defense:
    """The defense a benchmark row names (``X@threshold``: ``X`` with threshold selection)."""
    base, _, variant = name.partition("@")
    defense = parse_defense(base)
    if variant == "threshold":
        specs = {k: replace(s, selection="threshold") for k, s in defense.specs.items()}
        return replace(defense, specs=specs, name=name)
    if variant:
        raise ValueError(f"unknown variant {variant!r} in {name!r}; the only variant is '@threshold'")
    return defense


def _time_forward(fn: Callable[[], torch.Tensor], iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


@torch.no_grad()
def measure_overhead(
    model: nn.Module,
    x: torch.Tensor,
    defenses: Sequence[str] = BENCH_PRESETS,
    *,
    rounds: int = 7,
    iters: int = 3,
    model_name: str = "model",
    seed: int = 0,
    precision: Precision = FLOAT32,
) -> list[OverheadRow]:
    """Time ``model(x)`` against each defense in ``defenses`` that applies to ``model``, every forward
    in the ``precision`` setting.

    Defenses whose sites the model lacks (attention noise on a CNN) are skipped.
    """
    device = x.device
    model, x = precision.prepare(model, x)
    defended: dict[str, nn.Module] = {}
    for name in defenses:
        try:
            d = protect(model, bench_defense(name), seed=seed, validate=False)
        except ValueError:
            continue
        if any(s.selection == "threshold" and s.ratio < 1 for s in d.defense.specs.values()):
            with precision.autocast(device):
                d.calibrate_thresholds(x)
        defended[name] = d
    clean_run, runs = precision.wrap(model), {name: precision.wrap(d) for name, d in defended.items()}
    clean_run(x)  # warm-up: allocator, kernels, lazy generators and noise buffers
    for run in runs.values():
        run(x)
    rows = []
    for name, d in defended.items():
        clean_t, defended_t = [], []
        for r in range(rounds):
            pair = [(clean_t, lambda: clean_run(x)), (defended_t, lambda run=runs[name]: run(x))]
            for times, fn in pair if r % 2 == 0 else pair[::-1]:
                times.append(_time_forward(fn, iters, device))
        rows.append(
            OverheadRow(
                model=model_name,
                batch=len(x),
                defense=name,
                sites=len(d.sites),
                clean_ms=1000 * statistics.median(clean_t),
                defended_ms=1000 * statistics.median(defended_t),
                ratio=statistics.median(t / c for t, c in zip(defended_t, clean_t, strict=True)),
            )
        )
        d.remove()
    return rows


DEFAULT_MODELS: tuple[tuple[str, int], ...] = (
    ("mnist-cnn", 256),
    ("mnist-vit", 256),
    ("torchvision:resnet18", 16),
    ("timm:vit_tiny_patch16_224", 16),
)
"""(model, batch) pairs: the embedded models and two mid-size ImageNet-shaped ones (random weights)."""

LARGE_MODELS: tuple[tuple[str, int], ...] = (("timm:vit_base_patch16_224", 16), ("timm:resnet50", 16))
"""The full-size models of the papers (random weights, batch 16): an option (``--large``), slow on a CPU."""


def bench_models(
    models: Sequence[tuple[str, int]] = DEFAULT_MODELS,
    defenses: Sequence[str] = BENCH_PRESETS,
    *,
    device: torch.device | str = "cpu",
    rounds: int = 7,
    iters: int = 3,
    cache_dir: str | None = None,
    progress: bool = True,
    precision: Precision = FLOAT32,
) -> list[OverheadRow]:
    """Run :func:`measure_overhead` for each (model name, batch size), in the ``precision`` setting."""
    from ..models.zoo import load_model

    rows: list[OverheadRow] = []
    for name, batch in models:
        weights = "pretrained" if name.startswith("mnist-") else "random"
        model = load_model(name, weights=weights, device=device, cache_dir=cache_dir, progress=progress)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand((batch, *model.input_shape), generator=gen).to(device)
        rows += measure_overhead(
            model, x, defenses, rounds=rounds, iters=iters, model_name=name, precision=precision
        )
    return rows
