"""How the benchmarked forwards run: float32 or bfloat16 autocast, and the memory format of images.

These are the usual GPU serving settings (bf16 tensor cores, channels-last convolutions); a defense's
overhead is measured under the same setting as the unprotected model it is compared with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Precision:
    """``bf16``: forwards under ``torch.autocast(dtype=torch.bfloat16)`` (weights stay float32, matmuls
    and convolutions run in bfloat16). ``channels_last``: model and images in channels-last memory."""

    bf16: bool = False
    channels_last: bool = False

    def prepare(self, model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
        """``model`` and ``x`` in this setting's memory format (in place for the model)."""
        if self.channels_last and x.dim() == 4:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        return model, x

    @contextlib.contextmanager
    def autocast(self, device: torch.device) -> Iterator[None]:
        """The autocast context of this setting on ``device`` (none for float32)."""
        if not self.bf16:
            yield
            return
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` as a module whose forward runs in this setting and returns float32 logits (what the
        Oracle expects); the model itself when the setting is plain float32."""
        if not self.bf16:
            return model
        return _Autocast(model, self)

    def describe(self) -> str:
        parts = ["bf16 autocast" if self.bf16 else "float32"]
        if self.channels_last:
            parts.append("channels_last")
        return ", ".join(parts)


class _Autocast(nn.Module):
    """A model run under bf16 autocast, returning float32 logits."""

    def __init__(self, model: nn.Module, precision: Precision) -> None:
        super().__init__()
        self.model, self.precision = model, precision
        self.num_classes = getattr(model, "num_classes", None)
        self.input_shape = getattr(model, "input_shape", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast(x.device):
            return self.model(x).float()


FLOAT32 = Precision()
