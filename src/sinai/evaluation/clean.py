"""Clean accuracy of a (randomized) model: mean and std over M noisy passes of an image set."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_count
from ..models.classifier import check_images, parameter_dtype


@dataclass(frozen=True)
class CleanAccuracy:
    """``mean``/``std`` over ``passes`` (population std; 0 for one pass) and each pass's accuracy."""

    mean: float
    std: float
    per_pass: tuple[float, ...]
    images: int

    @property
    def passes(self) -> int:
        return len(self.per_pass)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels for ``images`` (moved batch by batch to the model's device)."""
    device = next(model.parameters()).device
    out = [
        model(images[i : i + batch_size].to(device)).argmax(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def clean_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    passes: int = 3,
    batch_size: int = 256,
    progress: bool = False,
    desc: str = "clean accuracy",
) -> CleanAccuracy:
    """Accuracy of ``model`` on ``images`` over ``passes`` forward passes (M = 3 in the papers).

    Every pass draws fresh noise from the model's own generator, so a seeded ``DefendedModel`` gives
    the same numbers on every run.
    """
    check_count("passes", passes, 1, "noisy passes of the clean accuracy")
    check_count("batch_size", batch_size, 1, "images per forward")
    check_images(images, getattr(model, "input_shape", None), parameter_dtype(model))
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes - 1}] for this model")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    accs = []
    for _ in tqdm(range(passes), desc=desc, disable=not progress, leave=False):
        accs.append((predict(model, images, batch_size=batch_size) == labels).float().mean().item())
    std = statistics.pstdev(accs) if len(accs) > 1 else 0.0
    return CleanAccuracy(statistics.fmean(accs), std, tuple(accs), len(images))
