"""Per-image state machines for the decision attacks: every oracle call asks every live image.

An attack written as synchronised loops (all images in a binary search, then all in a step search, ...)
queries fewer and fewer images per call as some finish a loop early, so most calls forward a small
batch. Written as a state machine, each image is in its own phase (start, line search, probes, step
search, ...) and makes its next query of that phase at every step; one oracle call answers the queries
of all live images, whatever their phases. An image's own sequence of queries depends only on its own
answers and its own random stream (:class:`~sinai.attacks.streams.ImageStreams`), so it is the same alone
as in a batch (RayS, :mod:`sinai.attacks.rays`, was the first attack built this way). :class:`PhaseRun`
is the loop, random start and binary search the attacks share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from .decision import ask
from .oracle import Oracle

#: Largest number of probe elements (probes x pixels) one image asks in one oracle call; fixed per image,
#: never derived from the batch, so that an image's draws are the same alone and in a batch.
PROBE_ELEMENTS = 1 << 19

#: Start tries an image asks one per oracle call; after that many misses it asks ``START_GROUP`` per call.
START_SINGLE = 10
START_GROUP = 10


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
            return [ask(oracle, self._cands[0], self._idx[0], y)]
        ok, adv = ask(oracle, torch.cat(self._cands), torch.cat(self._idx), y)
        sizes = [len(i) for i in self._idx]
        return list(zip(ok.split(sizes), adv.split(sizes), strict=True))


class PhaseRun:
    """Base of one run of a decision attack written as per-image state machines.

    A subclass keeps, per image, ``phase`` (its code; ``DONE``: nothing left to ask) and the state of
    its phases, maps each phase code to the method that asks that phase's next queries (``asks``:
    ``ask(calls, images)`` adds their candidates to ``calls`` and returns the handlers of the answers,
    one per group it added), and for the images in phase ``SEARCH`` keeps a binary search on
    ``point(images, r)`` over [``lo``, ``hi``] (adversarial at ``hi``, not at ``lo``) to ``tol``, which
    ``end_search`` ends. :meth:`run_phases` then makes one oracle call per step for all live images.

    The random start (:meth:`ask_start`) needs ``streams``, ``shape``, ``tries`` (per image) and
    ``a.start_tries``, and hands the adversarial starts it finds to ``begin_search``.
    """

    SEARCH: ClassVar[int]
    DONE: ClassVar[int]
    oracle: Oracle
    y: torch.Tensor
    phase: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    tol: torch.Tensor
    asks: dict[int, Callable[[Calls, torch.Tensor], list]]
    _active: torch.Tensor | None = None  # the last mask ``_asking`` handed out

    def run_phases(self) -> None:
        """Until no live image has a query left: one oracle call per step asks each its next query(s)."""
        while True:
            idx = self.oracle.live(among=self._asking())
            # one gather of the phases and one list of the codes per step (what the groups need anyway)
            phase = self.phase.index_select(0, idx)
            codes = present(phase)
            if self.SEARCH in codes:  # a search that starts narrow enough ends before its first query
                searching = idx[phase == self.SEARCH]
                narrow = searching[self.narrow(searching)]
                if len(narrow):
                    self.end_search(narrow)
                    phase = self.phase.index_select(0, idx)
                    codes = present(phase)
            asked = [code for code in codes if code != self.DONE]
            if not asked:
                return
            calls, handlers = Calls(), []
            for code in asked:  # phase by phase, in the order of the codes
                # one code: ``idx`` itself (no copy; the oracle's handed-out live set keeps its fast path)
                group = idx if len(codes) == 1 else idx[phase == code]
                handlers += self.asks[code](calls, group)
            for handler, (ok, adv) in zip(handlers, calls.ask(self.oracle, self.y), strict=True):
                handler(ok, adv)

    def _asking(self) -> torch.Tensor:
        """The images not ``DONE``, as a mask that stays the same tensor while no image becomes ``DONE``:
        the oracle then hands out the same live set again, and a step whose images all ask one query
        of one phase takes its fast path (images whose start failed stay live to the oracle but ask
        nothing)."""
        now = self.phase != self.DONE
        if self._active is not None and torch.equal(self._active, now):
            return self._active
        self._active = now
        return now

    # -- the random start
    def ask_start(self, calls: Calls, idx: torch.Tensor) -> list:
        """Random images until one is labelled adversarial, at most ``a.start_tries`` per image: uniform
        noise (the papers' start), every other try a binary image (a model that labels all uniform noise
        alike may still see one as another class), from the image's own stream; the first adversarial
        one goes to ``begin_search``, and an image that misses every try is ``DONE``.

        An image asks its first ``START_SINGLE`` tries one per call; one that missed that often is
        unlikely to find a start soon (its model labels most noise like the image), so it asks the rest
        ``START_GROUP`` per call: the tries of a group after its first adversarial one are spent for
        nothing, but it does not need ``start_tries`` oracle calls, alone at the end of a run.
        """
        tries = self.tries[idx]
        counts = torch.where(tries < START_SINGLE, 1, (self.a.start_tries - tries).clamp(max=START_GROUP))
        handlers = []
        for m, group in by_count(idx, counts):
            first = self.tries[group]
            noise = self.streams.uniform(group, (m, *self.shape))
            binary = (first[:, None] + torch.arange(m, device=idx.device)) % 2 == 1
            noise = torch.where(
                binary.view(*binary.shape, *[1] * len(self.shape)), (noise < 0.5).float(), noise
            )
            calls.add(noise.view(-1, *self.shape), group if m == 1 else group.repeat_interleave(m))

            def answer(
                ok: torch.Tensor, adv: torch.Tensor, group: torch.Tensor = group, m: int = m, noise=noise
            ) -> None:
                ok, adv = ok.view(-1, m), adv.view(-1, m)
                hit = adv.any(1)
                won = torch.nonzero(hit).flatten()
                self.begin_search(group[won], noise[won, adv[won].float().argmax(1)])  # the first hit
                missed = group[ok.all(1) & ~hit]
                self.tries[missed] += m
                self.phase[missed[self.tries[missed] >= self.a.start_tries]] = self.DONE

            handlers.append(answer)
        return handlers

    def begin_search(self, idx: torch.Tensor, outer: torch.Tensor) -> None:
        """Images ``idx`` found the adversarial starts ``outer``: next, their binary search."""
        raise NotImplementedError

    # -- the binary search of phase SEARCH
    def point(self, idx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The candidates of images ``idx`` at search parameters ``r``."""
        raise NotImplementedError

    def end_search(self, idx: torch.Tensor) -> None:
        """The searches of images ``idx`` are narrow enough: ``hi`` is their boundary point."""
        raise NotImplementedError

    def narrow(self, idx: torch.Tensor) -> torch.Tensor:
        """Per image of ``idx``: its search interval is within ``tol``."""
        return self.hi[idx] - self.lo[idx] <= self.tol[idx]

    def ask_search(self, calls: Calls, idx: torch.Tensor) -> list:
        """One bisection query per image: the midpoint of its interval."""
        mid = (self.lo[idx] + self.hi[idx]) / 2
        calls.add(self.point(idx, mid), idx)

        def answer(ok: torch.Tensor, adv: torch.Tensor) -> None:
            self.hi[idx[adv]] = mid[adv]
            self.lo[idx[ok & ~adv]] = mid[ok & ~adv]
            self.end_search(idx[ok & self.narrow(idx)])

        return [answer]


def present(codes: torch.Tensor) -> list[int]:
    """The distinct values of ``codes`` (small non-negative integers), ascending. ``bincount`` rather than
    ``unique``: after a forward has flushed the CPU's caches, its first call costs about 60 against 95
    microseconds (docs/benchmarks.md), and the loop asks once per oracle call."""
    return [code for code, n in enumerate(torch.bincount(codes).tolist()) if n]


def by_count(idx: torch.Tensor, counts: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``idx`` grouped by ``counts`` (one per entry), ascending: [(count, images with that count), ...].
    One count: ``idx`` itself (no copy; the oracle's handed-out live set keeps its fast path)."""
    values = torch.unique(counts).tolist()
    if len(values) == 1:
        return [(int(values[0]), idx)]
    return [(int(c), idx[counts == c]) for c in values]


__all__ = [
    "PROBE_ELEMENTS",
    "START_GROUP",
    "START_SINGLE",
    "Calls",
    "PhaseRun",
    "by_count",
    "present",
    "probe_chunk",
]
