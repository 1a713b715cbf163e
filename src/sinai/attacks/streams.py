"""Per-image random streams: draws that depend on (seed, image content, draw count), never on the batch.

A batched attack that drew from one shared ``torch.Generator`` would give image i different noise
depending on which other images are still live. Here an image's values depend only on the attack's
seed, a key derived from the image's own pixels and the number of values that image has drawn so far,
so one image attacked alone or among a thousand follows the same trajectory. Images at the same
stream position share one generator draw (seeded by seed and position) that each rotates by its own
key, so a batched draw costs one ``torch.randn`` plus a gather (no per-image Python loop).
"""

from __future__ import annotations

import math

import torch

_M32 = 0xFFFFFFFF


def hash32(v: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (xorshift-multiply), applied to int64 tensors holding values < 2**32."""
    v = v & _M32
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) & _M32
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


def hash32_int(v: int) -> int:
    """:func:`hash32` of one Python integer (the same bits: only the low 32 bits of each product count,
    so int64 wrap-around in the tensor version changes nothing), without creating tensors."""
    v &= _M32
    v ^= v >> 16
    v = (v * 0x7FEB352D) & _M32
    v ^= v >> 15
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


def image_keys(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One 32-bit key per image from its pixels (quantized to 1/4096, so exact on every device) and seed."""
    q = torch.round(x.flatten(1).double() * 4096).long()
    pos = torch.arange(q.shape[1], device=x.device)
    mixed = hash32(q ^ hash32(pos + 0x9E3779B9))
    key = mixed.sum(1) & _M32  # integer sum: exact and order-free
    return hash32(key ^ hash32(torch.full_like(key, seed & _M32) + 0x51ED27))


class ImageStreams:
    """Independent streams of uniform/normal draws, one per image (see the module docstring)."""

    def __init__(self, x: torch.Tensor, seed: int) -> None:
        self.keys = image_keys(x, seed)
        self.seed_mix = hash32_int(seed & _M32)
        self.counter = torch.zeros(len(x), dtype=torch.long, device=x.device)
        # count -> (every image's rotation keys % count, the count as a one-element tensor), made once
        self._per_count: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # (images, their version, their common position) after a draw that left them in lockstep
        self._lockstep: tuple[torch.Tensor, int, int] | None = None

    def _draw(self, idx: torch.Tensor, count: int, normal: bool) -> torch.Tensor:
        """(len(idx), count): the next ``count`` values of each image's stream (``idx``: distinct images).

        Images whose streams are at the same position share one generator draw, seeded by (seed,
        position), which each image then rotates by an offset taken from its own key: a Gaussian or
        uniform vector stays one under a fixed permutation, and nothing depends on the other images.
        """
        if count not in self._per_count:
            self._per_count[count] = (self.keys % count, torch.tensor([count], device=idx.device))
        shifts, step = self._per_count[count]
        ctr, positions = self._positions(idx)
        if len(positions) == 1:  # the images move in lockstep (the usual case): one draw for all
            out = self._rotated(positions[0], shifts[idx], count, normal)
        else:
            out = torch.empty((len(idx), count), device=idx.device)
            for c in positions:
                rows = torch.nonzero(ctr == c).flatten()
                out[rows] = self._rotated(c, shifts[idx[rows]], count, normal)
        self.counter.index_add_(0, idx, step.expand(len(idx)))
        together = len(positions) == 1
        self._lockstep = (idx, idx._version, positions[0] + count) if together else None
        return out

    def _positions(self, idx: torch.Tensor) -> tuple[torch.Tensor | None, list[int]]:
        """The stream positions of images ``idx`` (per image; None when known to be one) and their distinct
        values, ascending.

        When ``idx`` is the tensor of the last draw (each draw replaces ``_lockstep``), unchanged, its
        images are still in lockstep where that draw left them: no gather and no ``unique`` (each small op
        costs tens of microseconds right after a forward has flushed the CPU's caches; docs/benchmarks.md).
        """
        last = self._lockstep
        if last is not None and last[0] is idx and last[1] == idx._version:
            return None, [last[2]]
        ctr = self.counter[idx]
        return ctr, torch.unique(ctr).tolist()

    def _rotated(self, c: int, shifts: torch.Tensor, count: int, normal: bool) -> torch.Tensor:
        """The draw at stream position ``c``, rotated left by each of ``shifts`` (an image's key % count)."""
        seed = hash32_int(c & _M32 ^ self.seed_mix ^ (c >> 32))
        gen = torch.Generator(device=shifts.device).manual_seed(seed)
        draw = (torch.randn if normal else torch.rand)((count,), generator=gen, device=shifts.device)
        # row k of the windows of [draw, draw] is draw rotated by k: one gather, no index arithmetic
        windows = torch.cat([draw, draw]).unfold(0, count, 1)
        return windows.index_select(0, shifts)

    def uniform(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform [0, 1) floats of shape (len(idx), *shape)."""
        return self._draw(idx, math.prod(shape), normal=False).view(len(idx), *shape)

    def normal(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal floats of shape (len(idx), *shape)."""
        return self._draw(idx, math.prod(shape), normal=True).view(len(idx), *shape)

    def sign(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform +-1 floats of shape (len(idx), *shape)."""
        return torch.where(self.uniform(idx, shape) < 0.5, -1.0, 1.0)
