"""Per-image random streams: draws that depend on (seed, image content, draw count), never on the batch.

A batched attack that drew from one shared ``torch.Generator`` would give image i different noise
depending on which other images are still live. Here every value is a counter-based hash of the
attack's seed, a key derived from the image's own pixels and the number of values that image has
drawn so far, so one image attacked alone or among a thousand follows the same trajectory. All
arithmetic is vectorized integer work on the attack's device (no per-image Python loop).
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
        self.counter = torch.zeros(len(x), dtype=torch.long, device=x.device)

    def _bits(self, idx: torch.Tensor, count: int) -> torch.Tensor:
        """(len(idx), count) 32-bit values: the next ``count`` of each image's stream."""
        ctr = self.counter[idx][:, None] + torch.arange(count, device=idx.device)[None]
        self.counter.index_add_(0, idx, torch.full_like(idx, count))
        h = hash32(self.keys[idx][:, None] ^ hash32(ctr & _M32))
        return hash32(h ^ (ctr >> 32) ^ 0x2545F491)

    def uniform(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform (0, 1) floats of shape (len(idx), *shape)."""
        count = math.prod(shape)
        u = ((self._bits(idx, count) >> 8).float() + 0.5) / 2**24
        return u.view(len(idx), *shape)

    def normal(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal floats of shape (len(idx), *shape) (Box-Muller on two uniforms)."""
        count = math.prod(shape)
        u = self.uniform(idx, (2, count))
        z = torch.sqrt(-2 * torch.log(u[:, 0])) * torch.cos(2 * math.pi * u[:, 1])
        return z.view(len(idx), *shape)

    def sign(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform +-1 floats of shape (len(idx), *shape)."""
        return torch.where(self.uniform(idx, shape) < 0.5, -1.0, 1.0)
