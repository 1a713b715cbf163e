"""Robust accuracy by confirmation, next to the attack's own decision.

After an attack, every adversarial example the Oracle verified gets a fresh, uncounted confirmation of
N noisy passes; the store keeps per image the share of those passes that label the returned example
wrongly (``confirm_rate``, None when the image has no verified example or the run predates
confirmation) and N (``confirm_passes``). By confirmation, a success counts only when the majority of
the fresh passes misclassify the returned example; an image without a rate falls back to the attack's
decision (its verified success). Runs stored before confirmation existed have no rates.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..evaluation.store import ImageResult

CONF = "conf."
"""The suffix of a column of robust accuracy by confirmation."""


def confirm_rate(result: ImageResult) -> float | None:
    """The share of the fresh passes that misclassify the image's returned example (None: no data)."""
    return result.confirm_rate


def has_confirmation(results: Iterable[ImageResult]) -> bool:
    """Any of ``results`` carries a confirmation rate."""
    return any(confirm_rate(r) is not None for r in results)


def robust_confirmed_at(result: ImageResult, budget: int) -> bool:
    """Not broken within ``budget`` queries by confirmation (:meth:`ImageResult.robust_confirmed_at`)."""
    return result.robust_confirmed_at(budget)


def confirm_passes(results: Iterable[ImageResult]) -> list[int]:
    """The distinct numbers N of confirmation passes among ``results`` (those with a rate), sorted."""
    passes = {r.confirm_passes for r in results if r.confirm_rate is not None}
    return sorted(passes - {0})


def passes_text(results: Iterable[ImageResult]) -> str:
    """N as text: ``101``, ``51/101`` when runs used several, ``N`` when unknown."""
    passes = confirm_passes(results)
    return "/".join(map(str, passes)) if passes else "N"


def conf_note(results: Iterable[ImageResult]) -> str:
    """The note under a table with conf. columns."""
    passes = confirm_passes(results)
    n = f"N = {'/'.join(map(str, passes))}" if passes else "N"
    return (
        f"{CONF}: an image broken by the attack counts only if a majority of N fresh noisy passes ({n}) "
        "misclassify its returned example (an image without confirmation data counts by the decision); "
        "decision (the columns without conf.): the attack's own verified success."
    )
