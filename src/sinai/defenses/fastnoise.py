"""Fast exact noise on CPU: selection, Gaussian draws and addition fused in one compiled pass per row.

SINAI's logit-selective noise (SINAI, Sec. 3.2) adds fresh i.i.d. N(0, std^2) noise to exactly the
``k = ceil(ratio * n)`` smallest logits of each sample, on every forward. With torch ops on a CPU that
costs a ``topk`` over every entry and about 3-5 ns per Gaussian number from the serial CPU generator,
more than a small network's own forward. Here each sample's row is handled by one compiled function
(numba, ``nogil``) and rows are split over threads:

- selection: the ``k``-th smallest value is bracketed by the quantiles of a strided subsample, one
  branch-free pass lists the entries below the bracket and the few inside it, a histogram of those few
  finds the bucket that holds the ``k``-th value and an exact selection runs in that bucket (on the
  whole row when the bracket misses); ties at the ``k``-th value are taken in index order, so exactly
  ``k`` entries get noise;
- noise: each row has its own counter-based stream (SplitMix64, Steele et al., OOPSLA 2014) keyed by
  the row and one 64-bit key drawn per call from the defended model's seeded ``torch.Generator``, so
  the noise depends on the seed and the call, never on threads; Gaussians come from the ziggurat
  method (Marsaglia & Tsang, J. Stat. Softw. 2000) with separate random bits for layer and value
  (Doornik 2005), drawn in vectorised blocks and only for the selected entries.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # numba is a dependency; without it (an unusual install) the torch path is used
    import numba
except ImportError:  # pragma: no cover
    numba = None

_LAYERS = 1024  # more layers than RNOR's 256: fewer draws outside their layer's rectangle (0.4%, not 1.3%)
_LAYER_SHIFT = 54  # a draw's layer: the top log2(_LAYERS) bits of its 64-bit number


def _density(x: float) -> float:
    return math.exp(-0.5 * x * x)


def _ziggurat_base(layers: int) -> tuple[float, float]:
    """Where the tail begins, ``r``, and each layer's area, ``v``, for a ziggurat of ``layers`` layers
    under the unnormalised normal density: the ``r`` for which the layers of area ``v`` (the base strip
    being the rectangle under ``f(r)`` plus the tail) stack up to exactly ``f(0) = 1`` (found by
    bisection; gives Marsaglia & Tsang's r = 3.6541528853610088 for 256 layers)."""

    def overshoot(r: float) -> tuple[float, float]:
        v = r * _density(r) + math.sqrt(math.pi / 2) * math.erfc(r / math.sqrt(2))
        x = r
        for _ in range(layers - 2):
            top = v / x + _density(x)
            if top >= 1.0:  # the layers reach the top too early: r is too small
                return 1.0, v
            x = math.sqrt(-2.0 * math.log(top))
        return v / x + _density(x) - 1.0, v

    lo, hi = 2.0, 6.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if overshoot(mid)[0] > 0 else (lo, mid)
    return lo, overshoot(lo)[1]


_R, _V = _ziggurat_base(_LAYERS)


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ziggurat tables of the standard normal (Marsaglia & Tsang 2000, RNOR, with ``_LAYERS``
    layers): layer ``i``'s acceptance bound ``kn``, scale ``wn`` and density ``fn``."""
    dn = tn = _R
    m1 = 2147483648.0
    kn, wn, fn = np.zeros(_LAYERS, np.int64), np.zeros(_LAYERS), np.zeros(_LAYERS)
    q = _V / _density(dn)
    kn[0], kn[1] = int(dn / q * m1), 0
    wn[0], wn[-1] = q / m1, dn / m1
    fn[0], fn[-1] = 1.0, _density(dn)
    for i in range(_LAYERS - 2, 0, -1):
        dn = math.sqrt(-2.0 * math.log(_V / dn + _density(dn)))
        kn[i + 1] = int(dn / tn * m1)
        tn = dn
        fn[i], wn[i] = _density(dn), dn / m1
    return kn, wn, fn


_KN, _WN, _FN = _ziggurat_tables()

if numba is not None:
    _jit = numba.njit(nogil=True, cache=True, boundscheck=False)

    @_jit
    def _mix(z: np.uint64) -> np.uint64:
        """SplitMix64's output function (a bijective 64-bit mixer)."""
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    _GAMMA = np.uint64(0x9E3779B97F4A7C15)

    @_jit
    def _uniform(s: np.uint64) -> tuple[float, np.uint64]:
        """A uniform in (0, 1) (53 random bits) and the advanced stream state."""
        s = s + _GAMMA
        return ((_mix(s) >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0), s

    @_jit
    def _draw(s: np.uint64) -> tuple[np.int64, np.int64, np.uint64]:
        """One ziggurat draw: its value bits ``hz`` (a signed 32-bit integer) and, from other bits of the
        same 64-bit number, its layer ``iz``."""
        s = s + _GAMMA
        bits = _mix(s)
        value = np.int64(np.int32(np.uint32(bits & np.uint64(0xFFFFFFFF))))
        return value, np.int64(bits >> np.uint64(_LAYER_SHIFT)), s

    @_jit
    def _gauss_slow(hz: np.int64, iz: np.int64, s: np.uint64) -> tuple[float, np.uint64]:
        """The ziggurat's rare path (about 0.4% of draws): the tail or the wedge of layer ``iz``, then new
        draws until one is accepted."""
        while True:
            x = hz * _WN[iz]
            if iz == 0:  # the tail beyond R (Marsaglia 1964)
                while True:
                    u, s = _uniform(s)
                    x = -math.log(u) / _R
                    u, s = _uniform(s)
                    if -2.0 * math.log(u) >= x * x:
                        break
                return (_R + x if hz > 0 else -_R - x), s
            u, s = _uniform(s)
            if _FN[iz] + u * (_FN[iz - 1] - _FN[iz]) < math.exp(-0.5 * x * x):
                return x, s
            hz, iz, s = _draw(s)
            if abs(hz) < _KN[iz]:
                return hz * _WN[iz], s

    _M1 = np.uint64(0xBF58476D1CE4E5B9)
    _M2 = np.uint64(0x94D049BB133111EB)

    @_jit
    def _rectangles(vals: np.ndarray, m: int, s: np.uint64) -> None:
        """The fast part of ``m`` standard normal draws from the stream at ``s``: draw ``i`` is the
        ziggurat (Marsaglia & Tsang's, ``_LAYERS`` layers; value and layer from separate bits of one
        64-bit number) on the stream's ``i``-th number, in a branch-free loop the compiler vectorises;
        ``vals[i]`` is NaN where the draw falls outside its layer's rectangle (about 0.4%), which
        :func:`_finish` completes as its reader meets it, in order, on the numbers past the ``m``-th
        (``rest``, starting at ``s + m * gamma``)."""
        for i in range(m):
            bits = s + np.uint64(i + 1) * _GAMMA
            bits = (bits ^ (bits >> np.uint64(30))) * _M1
            bits = (bits ^ (bits >> np.uint64(27))) * _M2
            bits = bits ^ (bits >> np.uint64(31))
            hz = np.int32(np.uint32(bits & np.uint64(0xFFFFFFFF)))
            iz = np.int64(bits >> np.uint64(_LAYER_SHIFT))
            vals[i] = hz * _WN[iz] if abs(np.int64(hz)) < _KN[iz] else np.nan

    @_jit
    def _finish(i: int, s: np.uint64, rest: np.uint64) -> tuple[float, np.uint64]:
        """Draw ``i`` of :func:`_rectangles` at ``s`` that fell outside its rectangle, completed on the
        stream's spare numbers at ``rest``: (its value, the spare stream's next state). Read in the
        readers' loops, where the rare branch costs next to nothing, not in a separate pass."""
        hz, iz, _ = _draw(s + np.uint64(i) * _GAMMA)
        return _gauss_slow(hz, iz, rest)

    @_jit
    def _value(vals: np.ndarray, i: int, s: np.uint64, rest: np.uint64) -> tuple[float, np.uint64]:
        """Draw ``i`` of :func:`_rectangles` at ``s``, finished by :func:`_finish` if it needs it: (its
        value, the spare stream's next state)."""
        v = vals[i]
        if v != v:
            return _finish(i, s, rest)
        return v, rest

    @_jit
    def _select(a: np.ndarray, m: int, k: int) -> float:
        """The ``k``-th smallest (0-based) of ``a[:m]``, partitioning ``a`` in place (Hoare's FIND with a
        median-of-three pivot; a sort finishes the rare input that makes it take too many rounds)."""
        lo, hi = 0, m - 1
        rounds = 0
        while hi > lo:
            rounds += 1
            if rounds > 64:
                a[lo : hi + 1].sort()
                break
            mid = (lo + hi) >> 1
            if a[mid] < a[lo]:
                a[mid], a[lo] = a[lo], a[mid]
            if a[hi] < a[lo]:
                a[hi], a[lo] = a[lo], a[hi]
            if a[hi] < a[mid]:
                a[hi], a[mid] = a[mid], a[hi]
            pivot = a[mid]
            i, j = lo, hi
            while i <= j:
                while a[i] < pivot:
                    i += 1
                while a[j] > pivot:
                    j -= 1
                if i <= j:
                    a[i], a[j] = a[j], a[i]
                    i += 1
                    j -= 1
            if k <= j:
                hi = j
            elif k >= i:
                lo = i
            else:
                break
        return a[k]

    @_jit
    def _add_chosen(o, chosen, count, std, state, vals):  # pragma: no cover - compiled
        """Add ``std`` times a fresh standard normal to ``o`` at the ``count`` indices ``chosen``."""
        _rectangles(vals, count, state)
        rest = state + np.uint64(count) * _GAMMA
        features = std.shape[0]
        if features == 1:
            scale = std[0]
            for i in range(count):
                v, rest = _value(vals, i, state, rest)
                o[chosen[i]] += scale * v
        else:
            for i in range(count):
                v, rest = _value(vals, i, state, rest)
                j = chosen[i]
                o[j] += std[j % features] * v

    @_jit
    def _row_state(key: np.uint64, r: int) -> np.uint64:
        """The start of row ``r``'s stream under ``key``."""
        return _mix(key ^ _mix(np.uint64(r) + np.uint64(0x632BE59BD9B4E019)))

    _SAMPLE = 256
    _BUCKETS = 128

    @_jit
    def _choose_exact(
        row, o, k, chosen, band, scratch, sample, buckets, small, hist
    ) -> int:  # pragma: no cover - compiled
        """Copy ``row`` to ``o`` and list in ``chosen`` exactly the ``k`` smallest entries of ``row`` (ties
        at the ``k``-th value in index order); returns ``k``.

        The ``k``-th value is bracketed by quantiles of a strided subsample (Floyd & Rivest, CACM 1975):
        one branch-free pass copies the row, lists the entries below the bracket (all chosen) and the few
        inside it, a histogram of those few finds the bucket that holds the ``k``-th value, and an exact
        selection runs in that bucket. When the bracket misses (rare) the selection runs on the whole
        row.
        """
        n = row.shape[0]
        if n >= 8 * _SAMPLE:
            step = n // _SAMPLE
            for i in range(_SAMPLE):
                sample[i] = row[i * step]
            p = k / n
            margin = 3.0 * math.sqrt(p * (1.0 - p) / _SAMPLE) + 2.0 / _SAMPLE
            first = max(0, int((p - margin) * _SAMPLE))
            last = min(_SAMPLE - 1, int(math.ceil((p + margin) * _SAMPLE)))
            lo = _select(sample, _SAMPLE, first)
            # after the first selection, the entries past ``first`` are the ones >= lo
            hi = _select(sample[first:], _SAMPLE - first, last - first)
            count = 0
            inside = 0
            for j in range(n):
                v = row[j]
                o[j] = v
                chosen[count] = j
                count += v < lo
                band[inside] = j
                inside += (v >= lo) & (v <= hi)
            if count < k <= count + inside:
                # the (k - count)-th smallest of the bracket: a histogram of its values finds the bucket
                # that holds it, and the exact selection runs on that bucket alone
                need = k - count
                scale = _BUCKETS / (hi - lo) if hi > lo else 0.0
                hist[:] = 0
                for i in range(inside):
                    v = row[band[i]]
                    scratch[i] = v
                    b = min(int((v - lo) * scale), _BUCKETS - 1)
                    buckets[i] = b
                    hist[b] += 1
                before = 0
                target = 0
                while before + hist[target] < need:
                    before += hist[target]
                    target += 1
                size = 0
                for i in range(inside):
                    small[size] = scratch[i]
                    size += buckets[i] == target
                kth = _select(small, size, need - before - 1)
                ties = need - before
                for i in range(size):
                    ties -= small[i] < kth
                return _take(row, band, inside, kth, ties, chosen, count)
        for j in range(n):
            scratch[j] = row[j]
            o[j] = row[j]
            band[j] = j
        kth = _select(scratch, n, k - 1)
        less = 0
        for j in range(n):
            less += row[j] < kth
        return _take(row, band, n, kth, k - less, chosen, 0)

    @_jit
    def _take(row, among, m, kth, ties, chosen, count) -> int:  # pragma: no cover - compiled
        """Append to ``chosen[count:]`` the entries ``among[:m]`` of ``row`` below ``kth`` and the first
        ``ties`` equal to it, in index order (branch-free); returns the new count."""
        for i in range(m):
            j = among[i]
            v = row[j]
            chosen[count] = j
            equal = v == kth
            count += (v < kth) | (equal & (ties > 0))
            ties -= equal
        return count

    @_jit
    def _exact_rows(z, out, k, std, key, r0, r1):  # pragma: no cover - compiled
        n = z.shape[1]
        chosen = np.empty(n, np.int32)
        band = np.empty(n, np.int32)
        scratch = np.empty(n, z.dtype)
        sample = np.empty(_SAMPLE, z.dtype)
        buckets = np.empty(n, np.int32)
        small = np.empty(n, z.dtype)
        hist = np.empty(_BUCKETS, np.int64)
        vals = np.empty(n)
        for r in range(r0, r1):
            count = _choose_exact(z[r], out[r], k, chosen, band, scratch, sample, buckets, small, hist)
            _add_chosen(out[r], chosen, count, std, _row_state(key, r), vals)

    @_jit
    def _threshold_rows(z, out, threshold, std, key, r0, r1):  # pragma: no cover - compiled
        n = z.shape[1]
        chosen = np.empty(n, np.int32)
        vals = np.empty(n)
        for r in range(r0, r1):
            row = z[r]
            o = out[r]
            count = 0
            for j in range(n):
                v = row[j]
                o[j] = v
                chosen[count] = j
                count += v <= threshold
            _add_chosen(o, chosen, count, std, _row_state(key, r), vals)

    @_jit
    def _all_rows(z, out, std, key, r0, r1):  # pragma: no cover - compiled
        n = z.shape[1]
        features = std.shape[0]
        vals = np.empty(n)
        for r in range(r0, r1):
            row = z[r]
            o = out[r]
            state = _row_state(key, r)
            _rectangles(vals, n, state)
            rest = state + np.uint64(n) * _GAMMA
            for j in range(n):
                v, rest = _value(vals, j, state, rest)
                o[j] = row[j] + (std[0] if features == 1 else std[j % features]) * v

    @_jit
    def _fill_rows(z, out, std, key, r0, r1):  # pragma: no cover - compiled (z is out)
        n = out.shape[1]
        vals = np.empty(n)
        for r in range(r0, r1):
            o = out[r]
            state = _row_state(key, r)
            _rectangles(vals, n, state)
            rest = state + np.uint64(n) * _GAMMA
            for j in range(n):
                v, rest = _value(vals, j, state, rest)
                o[j] = std[0] * v


#: Entries below which one thread does the whole tensor (handing work to threads costs ~50 us).
PARALLEL_ENTRIES = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def available() -> bool:
    """Whether the compiled path can run here (numba is installed and ``SINAI_FAST_NOISE`` is not 0)."""
    return numba is not None and os.environ.get("SINAI_FAST_NOISE", "1") != "0"


def supports(z: torch.Tensor) -> bool:
    """Whether noise on ``z`` can take the compiled path: a float32/float64 CPU tensor outside autograd
    (white-box attacks differentiate through the noise and keep the torch path)."""
    return (
        z.device.type == "cpu"
        and z.dtype in (torch.float32, torch.float64)
        and not (torch.is_grad_enabled() and z.requires_grad)
        and z.dim() >= 1
        and z.numel() > 0
        and available()
    )


def _executor(threads: int) -> ThreadPoolExecutor:
    """The shared pool of noise threads (made again in a forked child, whose parent's threads are gone)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid() or _pool._max_workers < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sinai-noise")
            _pool_pid = os.getpid()
        return _pool


def _run(kernel, flat: np.ndarray, out: np.ndarray, *args) -> None:
    """``kernel(flat, out, *args, r0, r1)`` over the rows of ``flat``, split over torch's thread count."""
    rows = flat.shape[0]
    threads = 1 if flat.size < PARALLEL_ENTRIES else max(1, min(torch.get_num_threads(), rows))
    if threads == 1:
        kernel(flat, out, *args, 0, rows)
        return
    bounds = np.linspace(0, rows, threads + 1).astype(int)
    pool = _executor(threads - 1)
    jobs = [
        pool.submit(kernel, flat, out, *args, int(r0), int(r1))
        for r0, r1 in zip(bounds[1:-1], bounds[2:], strict=True)
    ]
    kernel(flat, out, *args, 0, int(bounds[1]))  # the first share on this thread, which would only wait
    for job in jobs:
        job.result()


def _std_array(std: float | torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    if isinstance(std, torch.Tensor):
        return std.detach().cpu().numpy().astype(np_dtype)
    return np.array([std], dtype=np_dtype)


def key_from(gen: torch.Generator) -> np.uint64:
    """A 64-bit stream key drawn from ``gen``, so the noise follows the defended model's seed."""
    hi, lo = torch.randint(0, 1 << 32, (2,), generator=gen, dtype=torch.int64).tolist()
    return np.uint64((hi << 32) | lo)


def _apply(kernel, z: torch.Tensor, *args, gen: torch.Generator) -> torch.Tensor:
    flat = z.detach().reshape(z.shape[0] if z.dim() > 1 else 1, -1).contiguous()
    out = torch.empty_like(flat)
    _run(kernel, flat.numpy(), out.numpy(), *args, key_from(gen))
    return out.view_as(z)


def add_exact(z: torch.Tensor, k: int, std: float | torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``z`` plus N(0, std^2) noise on exactly the ``k`` smallest entries of each sample (first
    dimension; 0 < k < entries per sample); ``std`` is a float or a vector over the last dimension."""
    return _apply(_exact_rows, z, k, _std_array(std, z.dtype), gen=gen)


def add_below(
    z: torch.Tensor, threshold: float, std: float | torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """``z`` plus N(0, std^2) noise on its entries ``<= threshold`` (threshold selection)."""
    return _apply(_threshold_rows, z, float(threshold), _std_array(std, z.dtype), gen=gen)


def add_all(z: torch.Tensor, std: float | torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``z`` plus N(0, std^2) noise on every entry."""
    return _apply(_all_rows, z, _std_array(std, z.dtype), gen=gen)


def fill(out: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Fill the contiguous CPU tensor ``out`` with N(0, std^2) noise, in place; returns ``out``."""
    flat = out.view(out.shape[0] if out.dim() > 1 else 1, -1).numpy()
    _run(_fill_rows, flat, flat, _std_array(float(std), out.dtype), key_from(gen))
    return out
