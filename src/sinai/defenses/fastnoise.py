"""Fast exact noise on CPU: selection, Gaussian draws and addition in a few vectorised passes per row.

SINAI's logit-selective noise (SINAI, Sec. 3.2) adds fresh i.i.d. N(0, std^2) noise to exactly the
``k = ceil(ratio * n)`` smallest logits of each sample, on every forward. With torch ops on a CPU that
costs a ``topk`` over every entry and about 3-5 ns per Gaussian number from the serial CPU generator,
more than a small network's own forward. Here each sample's row is handled by compiled functions (numba,
``nogil``) whose loops the compiler vectorises (with 512-bit vectors where the CPU has them), and rows
are split over threads (numba's own pool; Python threads where it cannot run):

- selection: the entries are mapped to integers of the same order, and the ``k``-th smallest is found
  by counting passes alone (a vectorised compare and sum each, about 7 per row on a ViT's GeLU logits,
  13-15 on the embedded CNN's, whose values are tied in many places):
  Newton steps from the previous row's ``k``-th value, then interpolation of the counts (with checks
  for a value tied many times and bisections when a step fails to halve the bracket), and one minimum
  pass when the ``k``-th is the first value above the bracket; ties at the ``k``-th value are taken in
  index order, so exactly ``k`` entries get noise;
- noise: each row has its own counter-based stream (SplitMix64, Steele et al., OOPSLA 2014) keyed by
  the row and one 64-bit key drawn per call from the defended model's seeded ``torch.Generator``, so
  the noise depends on the seed and the call, never on threads; each 64-bit number gives two Gaussians
  by the Box-Muller transform (Box & Muller, Ann. Math. Stat. 1958): 32 bits for the radius, 32 for the
  angle, with a logarithm, sine and cosine written as short series so that the loop vectorises
  (in float64 within 5e-7 of the exact transform, relative to the draw; in float32 within 2e-5, from
  rounding u near 1, where the radius is small);
  a selection of a quarter or more of a row draws for every entry and adds in the same loop under a
  mask, a smaller one draws only for the entries it lists.
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
    from llvmlite import ir
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover
    numba = None

_SERIES = (
    0.5,
    2.0**-31,
    2.0**-29 * math.pi / 4,
    math.sqrt(2.0),
    math.log(2.0),
    *(1.0 / (2 * i + 1) for i in range(1, 4)),  # log(m) = 2 atanh(t): t + t^3/3 + ... + t^7/7
    *((-1) ** i / math.factorial(2 * i + 1) for i in range(1, 4)),  # sin: th - th^3/3! + ... - th^7/7!
    *((-1) ** i / math.factorial(2 * i) for i in range(1, 5)),  # cos: 1 - th^2/2! + ... + th^8/8!
)
"""The Box-Muller transform's constants: 1/2, the scales of the radius and angle bits, sqrt(2), log(2)
and the series' coefficients. On their ranges (|t| <= 0.172, th < pi/4) the first left-out terms are
below 4e-7 (sine: th^9/9!; log: 2 t^9/9 is 3e-8; cosine: th^10/10! is 3e-8)."""

#: The constants in each float type the kernels run in (the float32 path computes in float32).
_CONSTANTS = {dtype: tuple(dtype(v) for v in _SERIES) for dtype in (np.float32, np.float64)}

if numba is not None:
    # contract: a * b + c may be one fused multiply-add (the series' terms; no other change of meaning)
    _jit = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy", fastmath={"contract"})

    @intrinsic
    def _wide(typingctx):  # pragma: no cover - compiled
        """Let the calling function's loops use the widest vectors the CPU has: LLVM's x86 tuning keeps
        AVX-512 CPUs at 256 bits unless a function asks (``prefer-vector-width``, a string attribute
        llvmlite does not list, hence the plain ``set.add``). Draws run about 20% faster with it."""

        def codegen(context, builder, signature, args):
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            return context.get_dummy_value()

        return numba.types.none(), codegen

    @intrinsic
    def _leading_zeros(typingctx, x):  # pragma: no cover - compiled
        """``llvm.ctlz`` (one instruction, vectorised), which numba does not expose."""

        def codegen(context, builder, signature, args):
            return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

        return x(x), codegen

    @intrinsic
    def _sqrt(typingctx, x):  # pragma: no cover - compiled
        """``llvm.sqrt``: numba's ``math.sqrt`` calls libm, which stops the loop from vectorising."""

        def codegen(context, builder, signature, args):
            return builder.call(builder.module.declare_intrinsic("llvm.sqrt", [args[0].type]), [args[0]])

        return x(x), codegen

    _GAMMA = np.uint64(0x9E3779B97F4A7C15)

    @_jit
    def _mix(z: np.uint64) -> np.uint64:
        """SplitMix64's output function (a bijective 64-bit mixer)."""
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    @_jit
    def _row_state(key: np.uint64, r: int) -> np.uint64:
        """The start of row ``r``'s stream under ``key``."""
        return _mix(key ^ _mix(np.uint64(r) + np.uint64(0x632BE59BD9B4E019)))

    @numba.njit(nogil=True, cache=True, error_model="numpy", inline="always")
    def _pair(bits, c, f):  # pragma: no cover - compiled
        """Two independent standard normal draws from the 64-bit number ``bits`` (Box-Muller), in the
        float type ``f`` with its constants ``c`` (:data:`_CONSTANTS`).

        The top 32 bits, their last bit set, are ``h`` and give ``u = h / 2^32`` in (0, 1) and the radius
        ``sqrt(-2 log u)`` (``log u`` from ``h``'s leading zeros and ``2 atanh(t)`` of its mantissa). The
        low 32 bits give the direction: ``th`` in [0, pi/4) and a reflection about the diagonal make an
        angle uniform in [0, pi/2), and two sign bits its quadrant (the quadrant's signs alone suffice:
        a quarter turn only swaps the two draws, which the reflection already does at random). All the
        integer work is on 32-bit lanes, so that the loop's vectors hold as many draws as floats."""
        half, scale_u, scale_th, sqrt2, ln2, l3, l5, l7, s3, s5, s7, k2, k4, k6, k8 = c
        one, two = f(1.0), f(2.0)
        u32 = np.uint32
        # (numba widens 32-bit integer results to 64 bits: every step is cast back)
        h = u32(u32(bits >> np.uint64(32)) | u32(1))
        zeros = _leading_zeros(h)
        mant = f(u32(h << zeros)) * scale_u  # u = mant * 2^-(zeros + 1), mant in [1, 2]
        exponent = f(np.int32(-1) - np.int32(zeros))
        big = mant > sqrt2  # log of a mantissa in [1/sqrt2, sqrt2]: |t| <= 0.172
        mant = mant * half if big else mant
        exponent = exponent + one if big else exponent
        t = (mant - one) / (mant + one)
        t2 = t * t
        log_u = exponent * ln2 + two * t * (one + t2 * (l3 + t2 * (l5 + t2 * l7)))
        radius = _sqrt(-two * log_u)
        low = u32(bits)
        th = f(np.int32(u32(low & u32(0x1FFFFFFF)))) * scale_th
        h2 = th * th
        sin = th * (one + h2 * (s3 + h2 * (s5 + h2 * s7)))
        cos = one + h2 * (k2 + h2 * (k4 + h2 * (k6 + h2 * k8)))
        swap = (low & u32(1 << 29)) != u32(0)
        first = -radius if (low & u32(1 << 30)) != u32(0) else radius
        second = -radius if low >= u32(1 << 31) else radius
        return first * (sin if swap else cos), second * (cos if swap else sin)

    @_jit
    def _gaussians(vals, m, s, c) -> None:  # pragma: no cover - compiled
        """``vals[:m]`` = ``m`` standard normal draws from the stream at ``s``, computed in ``vals``' float
        type: the stream's ``i``-th number gives draws ``i`` and ``i + m // 2`` (:func:`_pair`), and for
        an odd ``m`` the next number gives the last draw (loops whose second store is at the trip count
        vectorise; the compiler cannot prove any other offset safe)."""
        _wide()
        half = m >> 1
        for i in range(half):
            vals[i], vals[i + half] = _pair(_mix(s + np.uint64(i + 1) * _GAMMA), c, vals.dtype.type)
        if m > 2 * half:
            vals[m - 1] = _pair(_mix(s + np.uint64(half + 1) * _GAMMA), c, vals.dtype.type)[0]

    @_jit
    def _add_listed(o, chosen, count, std, state, vals, c) -> None:  # pragma: no cover - compiled
        """Add ``std`` times a fresh standard normal to ``o`` at the ``count`` indices ``chosen``."""
        _wide()
        _gaussians(vals, count, state, c)
        features = std.shape[0]
        if features == 1:
            scale = std[0]
            for i in range(count):
                o[chosen[i]] += scale * vals[i]
        else:
            for i in range(count):
                j = chosen[i]
                o[j] += std[j % features] * vals[i]

    @_jit
    def _add_where(row, o, keys, cut, split, std, s, c, vals) -> None:  # pragma: no cover - compiled
        """``o = row + std * noise`` where ``keys <= cut`` before ``split`` and ``keys <= cut - 1`` from
        it on (integer keys), ``o = row`` elsewhere; every entry has its draw from the stream at ``s``
        as :func:`_gaussians` lays them out (``std``: one value or one per feature of the last
        dimension). One std draws and adds in one vectorised loop."""
        _wide()
        n = row.shape[0]
        f = row.dtype.type
        zero = f(0.0)
        before, after = keys.dtype.type(cut), keys.dtype.type(cut - 1)
        if std.shape[0] == 1:
            scale = std[0]
            half = n >> 1
            for i in range(half):
                a, b = _pair(_mix(s + np.uint64(i + 1) * _GAMMA), c, f)
                j = i + half
                o[i] = row[i] + (scale * a if keys[i] <= (before if i < split else after) else zero)
                o[j] = row[j] + (scale * b if keys[j] <= (before if j < split else after) else zero)
            if n > 2 * half:
                j = n - 1
                a = _pair(_mix(s + np.uint64(half + 1) * _GAMMA), c, f)[0]
                o[j] = row[j] + (scale * a if keys[j] <= (before if j < split else after) else zero)
            return
        _gaussians(vals, n, s, c)
        features = std.shape[0]
        for start in range(0, n, features):  # (n is a multiple of the features)
            for q in range(features):
                j = start + q
                o[j] = row[j] + (std[q] * vals[j] if keys[j] <= (before if j < split else after) else zero)

    @_jit
    def _list_where(keys, cut, chosen, count, a, b) -> int:  # pragma: no cover - compiled
        """Append to ``chosen[count:]`` the entries ``a`` to ``b`` whose ``keys <= cut`` (branch-free)."""
        _wide()
        cut = keys.dtype.type(cut)
        for j in range(a, b):
            chosen[count] = j
            count += keys[j] <= cut
        return count

    @_jit
    def _add_selected(row, o, keys, cut, split, count, std, state, vals, chosen, c):  # pragma: no cover
        """Noise on the ``count`` entries whose ``keys <= cut`` before ``split`` and ``keys < cut`` from
        it on: drawn for every entry and added in masked passes when they are a quarter of the row or
        more, else drawn for the listed ones only."""
        n = row.shape[0]
        if 4 * count >= n:
            _add_where(row, o, keys, cut, split, std, state, c, vals)
            return
        o[:] = row
        listed = _list_where(keys, cut - 1, chosen, _list_where(keys, cut, chosen, 0, 0, split), split, n)
        _add_listed(o, chosen, listed, std, state, vals, c)

    @_jit
    def _order(row, keys, flip) -> tuple[int, int]:  # pragma: no cover - compiled
        """``keys``: integers in the order of the floats ``row`` (the IEEE bits, a negative's magnitude
        bits flipped by ``flip``, -0.0 made +0.0 so that equal floats have equal keys); returns their
        min and max."""
        _wide()
        bits = row.view(keys.dtype)
        low = keys.dtype.type(flip)
        high = -low - 1
        for j in range(row.shape[0]):
            b = bits[j]
            key = b ^ (flip if b < 0 else 0)
            key += key == -1
            keys[j] = key
            low = min(low, keys[j])
            high = max(high, keys[j])
        return low, high

    @_jit
    def _count_le(keys, t) -> int:  # pragma: no cover - compiled
        """How many ``keys`` are ``<= t``."""
        _wide()
        t = keys.dtype.type(t)
        one, zero = np.int32(1), np.int32(0)
        c = zero  # 32-bit sums (rows hold fewer than 2^31 entries): twice the lanes of 64-bit ones
        for j in range(keys.shape[0]):
            c = np.int32(c + (one if keys[j] <= t else zero))
        return c

    @_jit
    def _min_above(keys, t, none) -> int:  # pragma: no cover - compiled
        """The smallest key ``> t`` (``none`` if there is none)."""
        _wide()
        t = keys.dtype.type(t)
        none = keys.dtype.type(none)
        m = none
        for j in range(keys.shape[0]):
            v = keys[j]
            m = min(m, v if v > t else none)
        return m

    @_jit
    def _max_at_most(keys, t, none) -> int:  # pragma: no cover - compiled
        """The largest key ``<= t`` (``none`` if there is none)."""
        _wide()
        t = keys.dtype.type(t)
        none = keys.dtype.type(none)
        m = none
        for j in range(keys.shape[0]):
            v = keys[j]
            m = max(m, v if v <= t else none)
        return m

    @_jit
    def _at(low, p):
        """The key ``p - 1`` above ``low`` (position 0 stands for "below every key"). Positions are
        unsigned: a float64 row's keys can span more than an int64 difference holds."""
        return np.int64(np.uint64(low) + (p - np.uint64(1)))

    @_jit
    def _kth_key(keys, k, low, high, guess, density) -> tuple[int, int, float]:  # pragma: no cover
        """The ``k``-th smallest (1-based) of ``keys`` (whose min and max are ``low``, ``high``), how many
        keys are below it, and the density of keys near it (keys per key unit), by counting passes alone.

        The bracket ``lo < kth <= hi`` (count(<= lo) < k <= count(<= hi)) starts from the previous row's
        ``k``-th key ``guess`` and its ``density`` (0: none): Newton steps from the guess until the
        counts straddle ``k``; it then narrows by interpolating the counts. While steps fail to halve the
        bracket's count (a value tied many times, as a CNN's background gives, stops the counts from
        shrinking) it checks the bracket's top key, its bottom key and bisects, in turn; when the
        ``k``-th is the first key above ``lo``, one minimum pass finds it.
        """
        n = keys.shape[0]
        if k == 1:
            return low, 0, density
        one = np.uint64(1)
        lo, c_lo = np.uint64(0), 0
        hi, c_hi = np.uint64(high) - np.uint64(low) + one, n
        if density > 0.0 and low <= guess < high:
            p = np.uint64(guess) - np.uint64(low) + one
            for _ in range(6):  # Newton steps, a little long, until the counts straddle k
                c = _count_le(keys, _at(low, p))
                if c >= k:
                    hi, c_hi = p, c
                else:
                    lo, c_lo = p, c
                if lo > np.uint64(0) and c_hi < n:
                    break
                t = float(p) + 1.5 * (k - c - 0.5) / density
                if t <= float(lo) + 1.0 or t >= float(hi) - 1.0:
                    break
                p = np.uint64(t)
        stalls = 0  # steps in a row that failed to halve the bracket's count
        measured = False
        while hi - lo > one:
            if not measured and lo > np.uint64(0) and c_hi < n:  # the first bracket: a running mean
                measured = True
                found = (c_hi - c_lo) / float(hi - lo)
                density = found if density == 0.0 else 0.5 * (density + found)
            if c_lo == k - 1:
                return _min_above(keys, _at(low, lo), high), c_lo, density
            before = c_hi - c_lo
            if stalls % 3 == 1:  # the k-th may be the bracket's top key, tied many times: try it
                top = _max_at_most(keys, _at(low, hi), low)
                t = np.uint64(top) - np.uint64(low) + one
                c = _count_le(keys, _at(low, t - one))
                if c < k:
                    return top, c, density
                hi, c_hi = t - one, c
            elif stalls % 3 == 2:  # or its bottom key
                bottom = _min_above(keys, _at(low, lo), high)
                t = np.uint64(bottom) - np.uint64(low) + one
                c = _count_le(keys, bottom)
                if c >= k:
                    return bottom, c_lo, density
                lo, c_lo = t, c
            else:
                if stalls > 0:
                    t = lo + ((hi - lo) >> one)
                else:
                    share = (k - c_lo - 0.5) / (c_hi - c_lo)
                    t = min(max(lo + np.uint64(share * float(hi - lo)), lo + one), hi - one)
                c = _count_le(keys, _at(low, t))
                if c >= k:
                    hi, c_hi = t, c
                else:
                    lo, c_lo = t, c
            stalls = stalls + 1 if 2 * (c_hi - c_lo) > before else 0
        return _at(low, hi), c_lo, density

    @_jit
    def _split(keys, kth, ties, less, n) -> int:  # pragma: no cover - compiled
        """The index just past the ``ties``-th entry equal to ``kth`` (``n`` when no more are equal):
        blocks are counted in one vectorised pass each, and only the block that holds it is read."""
        _wide()
        if _count_le(keys, kth) - less == ties:
            return n
        kth = keys.dtype.type(kth)
        for a in range(0, n, 256):
            b = min(a + 256, n)
            equal = np.int32(0)
            for j in range(a, b):
                equal = np.int32(equal + (np.int32(1) if keys[j] == kth else np.int32(0)))
            if equal < ties:
                ties -= equal
                continue
            for j in range(a, b):
                ties -= keys[j] == kth
                if ties == 0:
                    return j + 1
        return n

    @_jit
    def _exact_rows(z, out, k, std, flip, c, key, r0, r1):  # pragma: no cover - compiled
        """Exactly the ``k`` smallest entries of each row get noise, ties at the ``k``-th value in index
        order (:func:`_kth_key`, :func:`_split`, :func:`_add_selected`)."""
        _wide()
        n = z.shape[1]
        keys = np.empty(n, flip.dtype)
        vals = np.empty(n + 1, z.dtype)
        chosen = np.empty(n, np.int32)
        kth, density = 0, 0.0  # the previous row's k-th key and the density of keys near it (0: none)
        for r in range(r0, r1):
            row, o = z[r], out[r]
            low, high = _order(row, keys, flip[0])
            kth, less, density = _kth_key(keys, k, low, high, kth, density)
            # the k - less entries equal to the k-th that come first get noise: all of them before
            # ``split``, none after (split = n when all entries equal to the k-th are taken)
            split = _split(keys, kth, k - less, less, n)
            _add_selected(row, o, keys, kth, split, k, std, _row_state(key, r), vals, chosen, c)

    @_jit
    def _threshold_rows(z, out, threshold, std, c, key, r0, r1):  # pragma: no cover - compiled
        _wide()
        n = z.shape[1]
        vals = np.empty(n + 1, z.dtype)
        chosen = np.empty(n, np.int32)
        for r in range(r0, r1):
            row = z[r]
            count = _count_le(row, threshold)
            _add_selected(row, out[r], row, threshold, n, count, std, _row_state(key, r), vals, chosen, c)

    @_jit
    def _all_rows(z, out, std, c, key, r0, r1):  # pragma: no cover - compiled
        _wide()
        n = z.shape[1]
        vals = np.empty(n + 1, z.dtype)
        every = z.dtype.type(np.inf)  # every entry is <= it (a NaN entry stays NaN either way)
        for r in range(r0, r1):
            _add_where(z[r], out[r], z[r], every, n, std, _row_state(key, r), c, vals)

    @_jit
    def _fill_rows(z, out, std, c, key, r0, r1):  # pragma: no cover - compiled (z is out)
        """``out``'s rows are ``std`` times their streams' draws, as :func:`_all_rows` adds them."""
        _wide()
        n = out.shape[1]
        f = out.dtype.type
        half = n >> 1
        vals = np.empty(n + 1, out.dtype)
        features = std.shape[0]
        for r in range(r0, r1):
            o, s = out[r], _row_state(key, r)
            if features == 1:
                scale = std[0]
                for i in range(half):
                    a, b = _pair(_mix(s + np.uint64(i + 1) * _GAMMA), c, f)
                    o[i] = scale * a
                    o[i + half] = scale * b
                if n > 2 * half:
                    o[n - 1] = scale * _pair(_mix(s + np.uint64(half + 1) * _GAMMA), c, f)[0]
            else:
                _gaussians(vals, n, s, c)
                for start in range(0, n, features):
                    for q in range(features):
                        o[start + q] = std[q] * vals[start + q]

    # Rows split over numba's own thread pool (OpenMP or TBB, whose workers spin a moment before they
    # sleep): a hand-off costs about 10 us, against 80-200 us through Python threads (see :func:`_run`).
    _parallel = numba.njit(nogil=True, cache=True, parallel=True)

    @_parallel
    def _exact_split(z, out, k, std, flip, c, key, parts):  # pragma: no cover - compiled
        for t in numba.prange(parts):
            _exact_rows(z, out, k, std, flip, c, key, len(z) * t // parts, len(z) * (t + 1) // parts)

    @_parallel
    def _threshold_split(z, out, threshold, std, c, key, parts):  # pragma: no cover - compiled
        for t in numba.prange(parts):
            _threshold_rows(z, out, threshold, std, c, key, len(z) * t // parts, len(z) * (t + 1) // parts)

    @_parallel
    def _all_split(z, out, std, c, key, parts):  # pragma: no cover - compiled
        for t in numba.prange(parts):
            _all_rows(z, out, std, c, key, len(z) * t // parts, len(z) * (t + 1) // parts)

    @_parallel
    def _fill_split(z, out, std, c, key, parts):  # pragma: no cover - compiled
        for t in numba.prange(parts):
            _fill_rows(z, out, std, c, key, len(z) * t // parts, len(z) * (t + 1) // parts)

    _SPLIT = {
        _exact_rows: _exact_split,
        _threshold_rows: _threshold_split,
        _all_rows: _all_split,
        _fill_rows: _fill_split,
    }

#: Entries below which one thread does the whole tensor (a hand-off costs about 10 us on numba's pool,
#: 80 us or more on Python threads; 2^16 entries take 40-60 us to draw).
PARALLEL_ENTRIES = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()
_layer_pid: int | None = None  # the process numba's thread pool runs in (-1: none can)


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
        and 0 < z.numel() // (z.shape[0] if z.dim() > 1 else 1) < 2**31  # (the kernels count in 32 bits)
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


def _numba_threads() -> bool:
    """Whether numba's thread pool can split rows in this process: a thread-safe threading layer
    (OpenMP or TBB; numba's fallback "workqueue" aborts when two threads launch at once, as a server's
    replicas may), started in this process (an OpenMP pool does not survive a fork)."""
    global _layer_pid
    if _layer_pid is None:
        from numba.np.ufunc import parallel

        if not parallel._is_initialized and numba.config.THREADING_LAYER == "default":
            # chosen at the first launch, in any code; a layer the user named is kept
            numba.config.THREADING_LAYER = "threadsafe"
        try:
            numba.set_num_threads(1)  # (starts the layer; the probe needs no team of every core)
            _fill_split(
                np.zeros((1, 2), np.float32),
                np.zeros((1, 2), np.float32),
                np.ones(1, np.float32),
                _CONSTANTS[np.float32],
                np.uint64(0),
                1,
            )
            _layer_pid = os.getpid() if numba.threading_layer() in ("omp", "tbb") else -1
        except ValueError:  # no thread-safe layer could be loaded
            _layer_pid = -1
    return _layer_pid == os.getpid()


def _run(kernel, flat: np.ndarray, out: np.ndarray, *args) -> None:
    """``kernel(flat, out, *args, r0, r1)`` over the rows of ``flat``, split over torch's thread count:
    on numba's thread pool where it is thread-safe, else on Python threads."""
    rows = flat.shape[0]
    threads = 1 if flat.size < PARALLEL_ENTRIES else max(1, min(torch.get_num_threads(), rows))
    if threads == 1:
        kernel(flat, out, *args, 0, rows)
        return
    if _numba_threads():
        threads = min(threads, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(threads)  # (this thread's share of the pool)
        _SPLIT[kernel](flat, out, *args, threads)
        return
    bounds = [rows * i // threads for i in range(threads + 1)]
    pool = _executor(threads - 1)
    jobs = [
        pool.submit(kernel, flat, out, *args, r0, r1) for r0, r1 in zip(bounds[1:-1], bounds[2:], strict=True)
    ]
    kernel(flat, out, *args, 0, bounds[1])  # the first share on this thread, which would only wait
    for job in jobs:
        job.result()


def _np_dtype(dtype: torch.dtype) -> type:
    return np.float32 if dtype == torch.float32 else np.float64


def _std_array(std: float | torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    if isinstance(std, torch.Tensor):
        return std.detach().cpu().numpy().astype(_np_dtype(dtype))
    return np.array([std], dtype=_np_dtype(dtype))


def key_from(gen: torch.Generator) -> np.uint64:
    """A 64-bit stream key drawn from ``gen``, so the noise follows the defended model's seed."""
    hi, lo = torch.randint(0, 1 << 32, (2,), generator=gen, dtype=torch.int64).tolist()
    return np.uint64((hi << 32) | lo)


# the bits that turn a negative float's IEEE bits into an integer of the same order (one entry: the
# kernel reads the key type from it)
_FLIP = {
    torch.float32: np.array([(1 << 31) - 1], np.int32),
    torch.float64: np.array([(1 << 63) - 1], np.int64),
}


def _apply(kernel, z: torch.Tensor, *args, gen: torch.Generator) -> torch.Tensor:
    flat = z.detach().reshape(z.shape[0] if z.dim() > 1 else 1, -1).contiguous()
    out = torch.empty_like(flat)
    _run(kernel, flat.numpy(), out.numpy(), *args, _CONSTANTS[_np_dtype(z.dtype)], key_from(gen))
    return out.view_as(z)


def add_exact(z: torch.Tensor, k: int, std: float | torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``z`` plus N(0, std^2) noise on exactly the ``k`` smallest entries of each sample (first
    dimension; 0 < k < entries per sample); ``std`` is a float or a vector over the last dimension."""
    return _apply(_exact_rows, z, k, _std_array(std, z.dtype), _FLIP[z.dtype], gen=gen)


def add_below(
    z: torch.Tensor, threshold: float, std: float | torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """``z`` plus N(0, std^2) noise on its entries ``<= threshold`` (threshold selection)."""
    cut = _np_dtype(z.dtype)(threshold)
    if cut > threshold:  # the kernel compares in z's type: the largest value not above the threshold
        cut = np.nextafter(cut, -np.inf)
    return _apply(_threshold_rows, z, cut, _std_array(std, z.dtype), gen=gen)


def add_all(z: torch.Tensor, std: float | torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``z`` plus N(0, std^2) noise on every entry."""
    return _apply(_all_rows, z, _std_array(std, z.dtype), gen=gen)


def fill(out: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Fill the contiguous CPU tensor ``out`` with N(0, std^2) noise, in place; returns ``out``."""
    flat = out.view(out.shape[0] if out.dim() > 1 else 1, -1).numpy()
    c = _CONSTANTS[_np_dtype(out.dtype)]
    _run(_fill_rows, flat, flat, _std_array(float(std), out.dtype), c, key_from(gen))
    return out
