"""The compiled CPU noise path (sinai.defenses.fastnoise) against what SINAI's noise must be.

Fresh i.i.d. N(0, std^2) per selected entry, per sample, per forward; exactly ceil(ratio * n) smallest
entries per sample; the same for a seed whatever the number of threads; the same distribution and
selection as the torch path (autograd, GPU) it stands in for. Statistics, never timings.
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from sinai.defenses import fastnoise, protect

pytestmark = pytest.mark.skipif(not fastnoise.available(), reason="numba is not installed")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_draws_are_standard_normal_in_the_body_and_the_tails():
    draws = fastnoise.fill(torch.empty(400, 5000), 1.0, gen()).double().flatten().numpy()
    n = len(draws)
    assert abs(draws.mean()) < 4 / math.sqrt(n)
    assert abs(draws.std() / 1.0 - 1) < 4 / math.sqrt(2 * n)
    assert stats.kstest(draws[:500_000], "norm").pvalue > 1e-3
    for cut in (0.01, 1.0, 2.0, 3.0, 4.0, 4.5):  # the centre (small radii) and the tails carry the right mass
        share = (np.abs(draws) < cut).mean() if cut < 0.5 else (np.abs(draws) > cut).mean()
        expected = 2 * stats.norm.cdf(cut) - 1 if cut < 0.5 else 2 * stats.norm.sf(cut)
        assert abs(share - expected) < 5 * math.sqrt(expected / n) + 1e-7, cut
    assert np.abs(draws).max() < 7


def _box_muller_reference(state: int, m: int) -> np.ndarray:
    """The draws of one stream from the exact Box-Muller formula (math's log, sin, cos in float64)."""
    gamma, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    half = m // 2
    out = np.empty(m)
    for i in range(half + m % 2):  # number i gives draws i and i + m // 2; an odd m's last number, the last
        bits = mix((state + (i + 1) * gamma) & mask)
        u = ((bits >> 32) | 1) / 2.0**32
        low = bits & 0xFFFFFFFF
        th = (low & 0x1FFFFFFF) * 2.0**-29 * math.pi / 4
        angle = math.pi / 2 - th if (low >> 29) & 1 else th  # uniform in [0, pi/2)
        signs = -1 if (low >> 30) & 1 else 1, -1 if low >> 31 else 1  # the quadrant
        radius = math.sqrt(-2 * math.log(u))
        if i < half:
            out[i] = signs[0] * radius * math.cos(angle)
            out[i + half] = signs[1] * radius * math.sin(angle)
        else:
            out[m - 1] = signs[0] * radius * math.cos(angle)
    return out[:m]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_vectorised_transform_is_box_muller(dtype):
    """The series for log, sin and cos in the compiled loop against the exact formula, draw by draw."""
    m, state = 20001, 0x1234_5678_9ABC_DEF0
    vals = np.empty(m + 1, dtype)
    fastnoise._gaussians(vals, m, np.uint64(state), fastnoise._CONSTANTS[dtype])
    expected = _box_muller_reference(state, m)
    tolerance = 2e-6 if dtype == np.float32 else 1e-6  # the series are cut for float32's resolution
    assert np.abs(vals[:m] - expected).max() < tolerance * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("n", [1000, 1001])
def test_the_fused_draw_and_add_loop_draws_what_the_transform_draws(n):
    """Noise on all entries and ``fill`` (loops that draw and add or store, or the buffered path for an
    odd row) are the row's stream as :func:`fastnoise._gaussians` lays it out, which the test above
    checks."""
    noisy = fastnoise.add_all(torch.zeros(3, n), 1.0, gen(5))
    filled = fastnoise.fill(torch.empty(3, n), 1.0, gen(5))
    key = fastnoise.key_from(gen(5))
    for row in range(3):
        vals = np.empty(n + 1, np.float32)
        state = np.uint64(fastnoise._row_state(key, row))  # (numba hands a uint64 back as a Python int)
        fastnoise._gaussians(vals, n, state, fastnoise._CONSTANTS[np.float32])
        assert np.array_equal(noisy[row].numpy(), vals[:n])
        assert np.array_equal(filled[row].numpy(), vals[:n])


def test_draws_are_independent_across_rows_calls_and_neighbours():
    g = gen(3)
    a = fastnoise.fill(torch.empty(64, 20000), 1.0, g).double()
    b = fastnoise.fill(torch.empty(64, 20000), 1.0, g).double()
    bound = 5 / math.sqrt(20000)
    corr = torch.corrcoef(a)
    assert (corr - torch.eye(64, dtype=corr.dtype)).abs().max() < bound  # across rows (images)
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < bound / 8  # across calls
    lag = torch.corrcoef(torch.stack([a[:, 1:].flatten(), a[:, :-1].flatten()]))[0, 1]
    assert abs(lag) < bound / 8  # successive draws of one stream


@pytest.mark.parametrize("n", [7, 300, 12544])
@pytest.mark.parametrize("pattern", ["random", "ties", "constant", "sorted", "reversed"])
def test_exactly_k_smallest_per_row_ties_in_index_order(n, pattern):
    torch.manual_seed(n)
    z = torch.randn(6, n)
    if pattern == "ties":
        z = (z * 3).round()  # a handful of distinct values, each repeated many times
    elif pattern == "constant":
        z = torch.full((6, n), 0.25)
    elif pattern == "sorted":
        z = z.sort(dim=1).values
    elif pattern == "reversed":
        z = z.sort(dim=1, descending=True).values
    for k in sorted({1, max(1, n // 3), max(1, n - 1)}):
        out = fastnoise.add_exact(z, k, 1.0, gen(k))
        chosen = out != z
        assert (chosen.sum(1) == k).all()
        kth = z.kthvalue(k, dim=1).values[:, None]
        assert (chosen <= (z <= kth)).all() and ((z < kth) <= chosen).all()
        tied = z == kth
        for row in range(len(z)):  # among entries equal to the k-th value, the first ones are taken
            taken = chosen[row] & tied[row]
            positions = torch.nonzero(tied[row]).flatten()
            assert torch.equal(taken[positions], torch.arange(len(positions)) < int(taken.sum()))


def test_threshold_and_all_add_noise_exactly_where_they_should():
    z = torch.randn(32, 1000)
    below = fastnoise.add_below(z, -0.2, 0.5, gen())
    assert torch.equal(below != z, z <= -0.2)
    everywhere = fastnoise.add_all(z, 0.5, gen())
    assert (everywhere != z).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_key_same_noise_whatever_the_thread_count(dtype, monkeypatch):
    """Rows split over numba's thread pool, over Python threads (where no thread-safe pool can run) or
    not at all give the same noise."""
    z = torch.randn(48, 5000, dtype=dtype)
    monkeypatch.setattr(fastnoise, "PARALLEL_ENTRIES", 1)
    results = []
    for threads, pool in ((1, True), (2, True), (3, True), (2, False), (3, False)):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        monkeypatch.setattr(fastnoise, "_layer_pid", None if pool else -1)
        results.append(
            (
                fastnoise.add_exact(z, 1850, 0.3, gen(9)),
                fastnoise.add_below(z, 0.1, 0.3, gen(9)),
                fastnoise.add_all(z, 0.3, gen(9)),
                fastnoise.fill(torch.empty_like(z), 0.3, gen(9)),
            )
        )
        assert pool or not fastnoise._numba_threads()  # (a machine without OpenMP or TBB has no pool)
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(results[0], r, strict=True))
    assert results[0][0].dtype == dtype
    assert not torch.equal(results[0][0], fastnoise.add_exact(z, 1850, 0.3, gen(10)))


def test_without_a_thread_safe_pool_rows_go_to_python_threads():
    """numba's "workqueue" layer aborts when two threads launch at once: where it is the only one (here
    named by the user), the rows are split over Python threads and the noise is the same."""
    script = (
        "import sinai, torch\n"
        "from sinai.defenses import fastnoise\n"
        "torch.set_num_threads(2)\n"
        "z = torch.randn(64, 4096)\n"
        "noisy = fastnoise.add_exact(z, 1000, 0.3, torch.Generator().manual_seed(9))\n"
        "torch.set_num_threads(1)\n"
        "alone = fastnoise.add_exact(z, 1000, 0.3, torch.Generator().manual_seed(9))\n"
        "print(fastnoise._numba_threads(), torch.equal(noisy, alone), (noisy != z).sum().item())\n"
    )
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True", str(64 * 1000)]


def test_vector_std_scales_each_feature():
    z = torch.zeros(20000, 4)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    noise = fastnoise.add_all(z, std, gen())
    assert torch.allclose(noise.std(0).double(), std, rtol=0.05)


@torch.no_grad()
def test_compiled_and_torch_paths_select_alike_and_draw_alike(monkeypatch):
    """The torch path (autograd, GPU, SINAI_FAST_NOISE=0) and the compiled one: the same entries get
    noise, and the noise has one distribution (two-sample KS), on a real defended CNN's ReLU sites."""
    from sinai.models.classifier import ImageClassifier

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10)
    )
    model = ImageClassifier(net, input_shape=(1, 8, 8), num_classes=10, mean=(0.0,), std=(1.0,)).eval()
    x = torch.rand(64, 1, 8, 8)
    seen = {}

    def spy(name):
        return lambda m, args: seen.setdefault(name, args[0].clone())

    noises = {}
    for mode in ("compiled", "torch"):
        monkeypatch.setenv("SINAI_FAST_NOISE", "1" if mode == "compiled" else "0")
        seen.clear()
        defended = protect(model, "SINAI:relu.std=0.4,relu.ratio=0.37", seed=1)
        handle = net[1].register_forward_pre_hook(spy("noisy"))
        defended(x)
        handle.remove()
        defended.remove()
        noises[mode] = seen["noisy"] - net[0](x)
    chosen = {mode: n != 0 for mode, n in noises.items()}
    assert torch.equal(chosen["compiled"], chosen["torch"])  # continuous logits: no ties to break
    a, b = (noises[m][chosen[m]].double().numpy() for m in ("compiled", "torch"))
    assert stats.ks_2samp(a, b).pvalue > 1e-3
    assert abs(a.std() / 0.4 - 1) < 0.03


def test_autograd_keeps_the_differentiable_torch_path():
    z = torch.randn(4, 100, requires_grad=True)
    assert not fastnoise.supports(z)
    with torch.no_grad():
        assert fastnoise.supports(z)
    assert not fastnoise.supports(torch.randn(4, 100).half())
