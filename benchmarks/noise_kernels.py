"""docs/benchmarks.md: the compiled noise kernels alone, ns per entry, on the embedded models' activations.

Captures the pre-activation logits each SINAI site sees (mnist-vit's GeLUs, mnist-cnn's first two ReLUs,
batch 256 of MNIST test images) and times ``fastnoise.add_exact`` at the preset ratio, ``add_all`` and
``add_below`` on them with one thread: best of 15 timings of 5 calls, two alternating rounds.
Run it pinned to one core: ``taskset -c 1 python benchmarks/noise_kernels.py``.
"""

import time

import torch

from sinai.defenses import fastnoise, selected_count
from sinai.models.data import mnist, sample
from sinai.models.zoo import load_model

torch.set_num_threads(1)
x, _ = sample(mnist("test"), 256, seed=0)


def captured(model_name: str, kind: type[torch.nn.Module], count: int) -> list[torch.Tensor]:
    """The inputs of the first ``count`` modules of type ``kind`` in one clean forward."""
    model = load_model(model_name, progress=False)
    seen: list[torch.Tensor] = []
    sites = [m for m in model.modules() if isinstance(m, kind)][:count]
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone())) for m in sites]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen[:count]


def per_entry(fn, z: torch.Tensor) -> float:
    fn()
    best = min(_timed(fn) for _ in range(15))
    return best / z.numel() * 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    for _ in range(5):
        fn()
    return (time.perf_counter() - start) / 5


def report(name: str, z: torch.Tensor, ratio: float, std: float, rnd: int) -> None:
    gen = torch.Generator().manual_seed(0)
    k = selected_count(ratio, z[0].numel())
    threshold = float(z.flatten().kthvalue(k * len(z)).values)
    exact = per_entry(lambda: fastnoise.add_exact(z, k, std, gen), z)
    every = per_entry(lambda: fastnoise.add_all(z, std, gen), z)
    below = per_entry(lambda: fastnoise.add_below(z, threshold, std, gen), z)
    print(
        f"round {rnd}  {name:24s} ({z[0].numel():5d} per row)  exact {exact:.2f}  all {every:.2f}  "
        f"threshold {below:.2f} ns/entry",
        flush=True,
    )


cases = [("mnist-vit GeLU 1, 70%", z, 0.7, 0.06) for z in captured("mnist-vit", torch.nn.GELU, 1)]
cases += [
    (f"mnist-cnn ReLU {i + 1}, 37%", z, 0.37, 0.23)
    for i, z in enumerate(captured("mnist-cnn", torch.nn.ReLU, 2))
]
for rnd in range(2):
    for case in cases:
        report(*case, rnd)
