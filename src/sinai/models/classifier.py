"""The one model type every part of sinai sees: a classifier on [0, 1] images that normalizes inside.

Budgets (eps) and input noise are in [0, 1] pixel units, as in the papers, so every model is wrapped
once at load time and nothing downstream needs to know its normalization.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ImageClassifier(nn.Module):
    """Wrap ``net`` so that it takes images in [0, 1] of shape ``(B, *input_shape)``.

    ``mean``/``std`` are the per-channel normalization the network was trained with.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        name: str = "model",
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
        channels = input_shape[0]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values (one per channel), got {len(mean)}/{len(std)}")
        self.net = net
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.name = name
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def check_images(self, x: torch.Tensor) -> None:
        """Raise a clear error unless ``x`` is a float batch of this model's shape with values in [0, 1]."""
        check_images(x, self.input_shape)


def check_images(
    x: torch.Tensor, input_shape: Sequence[int] | None = None, dtype: torch.dtype | None = None
) -> None:
    """Raise ``ValueError`` naming the problem unless ``x`` is a (B, C, H, W) float batch in [0, 1] (no
    NaN). ``dtype``: the model's parameter dtype; float64 images are refused unless it is float64 too."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(
            f"images must be floating point in [0, 1], got dtype {x.dtype}; convert with x.float() / 255"
        )
    if x.dtype == torch.float64 and dtype is not None and dtype != torch.float64:
        raise ValueError(f"images are float64 but the model computes in {dtype}; convert with x.float()")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"images have shape {tuple(x.shape)}, expected (B, {', '.join(map(str, input_shape))}); "
            "add a batch dimension with x.unsqueeze(0) or resize to the model's input size"
        )
    if x.dim() != 4:
        raise ValueError(f"images must be a 4-d batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.numel():
        lo, hi = torch.aminmax(x.detach())
        if not (lo >= 0 and hi <= 1):  # NaN fails both
            if lo.isnan() or hi.isnan():
                raise ValueError(
                    f"images contain NaN ({int(x.detach().isnan().sum())} values): a model's output on them "
                    "is meaningless; images must be finite pixels in [0, 1]"
                )
            raise ValueError(
                f"images must lie in [0, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]; "
                "pass un-normalized pixels divided by 255 (the model normalizes inside)"
            )


def parameter_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (None without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
