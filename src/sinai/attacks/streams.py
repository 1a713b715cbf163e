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
        self.seed_mix = int(hash32(torch.tensor([seed & _M32]))[0])
        self.counter = torch.zeros(len(x), dtype=torch.long, device=x.device)

    def _draw(self, idx: torch.Tensor, count: int, normal: bool) -> torch.Tensor:
        """(len(idx), count): the next ``count`` values of each image's stream.

        Images whose streams are at the same position share one generator draw, seeded by (seed,
        position), which each image then rotates by an offset taken from its own key: a Gaussian or
        uniform vector stays one under a fixed permutation, and nothing depends on the other images.
        """
        out = torch.empty((len(idx), count), device=idx.device)
        ctr = self.counter[idx]
        for c in torch.unique(ctr).tolist():  # one value when the images move in lockstep (the usual case)
            rows = torch.nonzero(ctr == c).flatten()
            seed = int(hash32(torch.tensor([c & _M32 ^ self.seed_mix ^ (c >> 32)]))[0])
            gen = torch.Generator(device=idx.device).manual_seed(seed)
            draw = (torch.randn if normal else torch.rand)((count,), generator=gen, device=idx.device)
            shift = self.keys[idx[rows]] % count
            pos = (torch.arange(count, device=idx.device)[None] + shift[:, None]) % count
            out[rows] = draw[pos]
        self.counter.index_add_(0, idx, torch.full_like(idx, count))
        return out

    def uniform(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform [0, 1) floats of shape (len(idx), *shape)."""
        return self._draw(idx, math.prod(shape), normal=False).view(len(idx), *shape)

    def normal(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal floats of shape (len(idx), *shape)."""
        return self._draw(idx, math.prod(shape), normal=True).view(len(idx), *shape)

    def sign(self, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform +-1 floats of shape (len(idx), *shape)."""
        return torch.where(self.uniform(idx, shape) < 0.5, -1.0, 1.0)
