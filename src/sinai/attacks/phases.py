"""Per-image state machines for the decision attacks: every oracle call asks every live image.

An attack written as synchronised loops (all images in a binary search, then all in a step search, ...)
queries fewer and fewer images per call as some finish a loop early, so most calls forward a small
batch. Written as a state machine, each image is in its own phase (start, line search, probes, step
search, ...) and makes its next query of that phase at every step; one oracle call answers the queries
of all live images, whatever their phases. An image's own sequence of queries depends only on its own
answers and its own random stream (:class:`~sinai.attacks.streams.ImageStreams`), so it is the same alone
as in a batch (RayS, :mod:`sinai.attacks.rays`, was the first attack built this way).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .decision import ask
from .oracle import Oracle

#: Largest number of probe elements (probes x pixels) one image asks in one oracle call; fixed per image,
#: never derived from the batch, so that an image's draws are the same alone and in a batch.
PROBE_ELEMENTS = 1 << 19


def probe_chunk(d: int) -> int:
    """Probes of ``d`` pixels one image asks per oracle call (at least 1)."""
    return max(1, PROBE_ELEMENTS // d)


class Calls:
    """The queries of one oracle call, gathered from several groups of images: one ask, answers split.

    Each group's candidates of one image are contiguous, and an image is in one group per call, so the
    oracle counts an image's queries in the order the image asked them.
    """

    def __init__(self) -> None:
        self._cands: list[torch.Tensor] = []
        self._idx: list[torch.Tensor] = []

    def add(self, cand: torch.Tensor, idx: torch.Tensor) -> int:
        """Add candidates ``cand`` of images ``idx`` (one row each); returns the group's number."""
        self._cands.append(cand)
        self._idx.append(idx)
        return len(self._idx) - 1

    def ask(self, oracle: Oracle, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One oracle call: (answered, adversarial) per group, in the order the groups were added."""
        if not self._idx:
            return []
        if len(self._idx) == 1:
            # one group: its own tensors, no copy (the oracle's handed-out live set keeps its fast path)
            ok, adv = ask(oracle, self._cands[0], self._idx[0], y)
        else:
            ok, adv = ask(oracle, torch.cat(self._cands), torch.cat(self._idx), y)
        sizes = [len(i) for i in self._idx]
        return list(zip(ok.split(sizes), adv.split(sizes), strict=True))


def by_count(idx: torch.Tensor, counts: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``idx`` grouped by ``counts`` (one per entry), ascending: [(count, images with that count), ...].
    One count: ``idx`` itself (no copy; the oracle's handed-out live set keeps its fast path)."""
    values = torch.unique(counts).tolist()
    if len(values) == 1:
        return [(int(values[0]), idx)]
    return [(int(c), idx[counts == c]) for c in values]


def keep(idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``idx[mask]``, or ``idx`` itself when the mask keeps every entry (see :func:`by_count`)."""
    return idx if bool(mask.all()) else idx[mask]


def ask_random_starts(
    attack: object,
    calls: Calls,
    idx: torch.Tensor,
    *,
    done: int,
    found: Callable[[torch.Tensor, torch.Tensor], None],
) -> list:
    """The random-start phase the decision attacks share: each image in ``idx`` asks one random image
    (every other try a binary one) from its own stream; ``found(images, starts)`` takes those whose start
    is adversarial, and an image that misses ``attack.a.start_tries`` times is ``done``.

    ``attack`` carries ``streams``, ``shape``, ``tries``, ``phase`` and ``a.start_tries``.
    """
    handlers = []
    for binary, group in by_count(idx, attack.tries[idx] % 2):
        noise = attack.streams.uniform(group, attack.shape)
        if binary:
            noise = (noise < 0.5).float()
        calls.add(noise, group)

        def answer(ok: torch.Tensor, adv: torch.Tensor, group: torch.Tensor = group, noise=noise) -> None:
            found(group[adv], noise[adv])
            missed = group[ok & ~adv]
            attack.tries[missed] += 1
            attack.phase[missed[attack.tries[missed] >= attack.a.start_tries]] = done

        handlers.append(answer)
    return handlers


__all__ = ["PROBE_ELEMENTS", "Calls", "ask_random_starts", "by_count", "keep", "probe_chunk"]
