"""Intervals and paired tests for the rates the reports print.

- Every rate (robust accuracy over N images, a worst case, an attack's success rate) carries its 95%
  Wilson score interval (:func:`wilson_interval`).
- Clean accuracy of a randomized model is the mean over M noisy passes of the same N images
  (:func:`clean_interval`): its variance is ``Var_images(p_i) / N + E[p_i (1 - p_i)] / (N M)`` for the
  per-image probabilities ``p_i`` of a correct label, at most ``p (1 - p) / N``, so the Wilson interval
  of the pass-mean over the N images covers both the choice of images and the noise of the passes.
- Two methods on the same images are compared with a paired test: the exact McNemar test, a two-sided
  binomial test on the discordant images (:func:`mcnemar_exact`), and the difference of the two rates
  with Newcombe's square-and-add interval for paired proportions (:func:`paired_difference_interval`;
  Newcombe, "Improved confidence intervals for the difference between binomial proportions based on
  paired data", Statistics in Medicine 17, 1998, method 10).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

ALPHA = 0.05
"""Level of the paired tests behind every "best" marking (two-sided)."""

CONFIDENCE = 0.95
"""Confidence of every interval the reports print."""


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the rate ``successes / n`` (as fractions in [0, 1]).

    The same numbers as ``scipy.stats.binomtest(successes, n).proportion_ci(confidence, "wilson")``,
    without importing scipy. ``successes`` may be fractional (a mean over passes times ``n``). ``n = 0`` is
    a ``ValueError`` (no images, no rate).
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"a rate needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def clean_interval(mean: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """95% interval of a clean accuracy ``mean`` (a fraction, the mean over M noisy passes of ``n``
    images): the Wilson interval of the pass-mean over the ``n`` images (see the module docstring)."""
    if not 0 <= mean <= 1:
        raise ValueError(f"clean accuracy must be a fraction in [0, 1], got {mean}")
    return wilson_interval(mean * n, n, confidence)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``only_a`` successes in ``only_a + only_b``
    discordant images at rate 1/2 (doubled smaller tail, at most 1; 1 without discordant images)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_difference_interval(
    both: int, only_a: int, only_b: int, neither: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Newcombe's square-and-add interval (1998, method 10) of ``rate_a - rate_b`` for paired data:
    ``both`` images counted by both methods, ``only_a`` / ``only_b`` by one, ``neither`` by none."""
    counts = (both, only_a, only_b, neither)
    if min(counts) < 0 or sum(counts) < 1:
        raise ValueError(f"paired counts must be >= 0 with at least one image, got {counts}")
    n = sum(counts)
    a_yes, a_no, b_yes, b_no = both + only_a, only_b + neither, both + only_b, only_a + neither
    p1, p2 = a_yes / n, b_yes / n
    l1, u1 = wilson_interval(a_yes, n, confidence)
    l2, u2 = wilson_interval(b_yes, n, confidence)
    phi = 0.0
    if min(a_yes, a_no, b_yes, b_no) > 0:  # the correlation of the two rates, continuity-corrected
        cross = both * neither - only_a * only_b
        corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
        phi = corrected / math.sqrt(a_yes * a_no * b_yes * b_no)
    d = p1 - p2
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 + (u2 - p2) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)))
    high = d + math.sqrt(max(0.0, (p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)))
    return max(-1.0, low), min(1.0, high)


@dataclass(frozen=True)
class Paired:
    """Two methods' outcomes (e.g. robust or not) on the same ``n`` images: ``both`` / ``neither`` the
    concordant images, ``only_a`` / ``only_b`` the discordant ones."""

    both: int
    only_a: int
    only_b: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def rate_a(self) -> float:
        return (self.both + self.only_a) / self.n

    @property
    def rate_b(self) -> float:
        return (self.both + self.only_b) / self.n

    @property
    def difference(self) -> float:
        """``rate_a - rate_b`` (a fraction)."""
        return (self.only_a - self.only_b) / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """95% interval of :attr:`difference` (:func:`paired_difference_interval`)."""
        return paired_difference_interval(self.both, self.only_a, self.only_b, self.neither)

    @property
    def p_value(self) -> float:
        """Exact McNemar p-value (:func:`mcnemar_exact`)."""
        return mcnemar_exact(self.only_a, self.only_b)

    def a_better(self, alpha: float = ALPHA) -> bool:
        """A's rate is significantly higher than B's (two-sided test at ``alpha``, A ahead)."""
        return self.only_a > self.only_b and self.p_value < alpha


def paired(a: Mapping[int, bool], b: Mapping[int, bool]) -> Paired:
    """Pair two methods' per-image outcomes (image key -> counted) on the images both have; a
    ``ValueError`` when they share none."""
    common = a.keys() & b.keys()
    if not common:
        raise ValueError("the two methods share no image: a paired comparison needs the same images")
    both = sum(a[k] and b[k] for k in common)
    only_a = sum(a[k] and not b[k] for k in common)
    only_b = sum(b[k] and not a[k] for k in common)
    return Paired(both, only_a, only_b, len(common) - both - only_a - only_b)
