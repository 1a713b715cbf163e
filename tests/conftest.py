"""Shared test options and helpers: slow checks run only with --runslow, GPU checks only where CUDA
exists; the short training recipes, the session's short-trained models and images, tiny networks and a
model wrapper that counts queries. Test modules import the helpers with ``from conftest import ...``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest
import timm
import torch
from torch import nn

from sinai.models.classifier import ImageClassifier
from sinai.models.embedded import EMBEDDED, TrainConfig


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


# ------------------------------------------------------------------------------ short training
SHORT_RECIPES: Mapping[str, TrainConfig] = {
    "mnist-cnn": TrainConfig(
        epochs=2, batch_size=64, lr=3e-3, weight_decay=5e-4, augment=0, train_images=2000
    ),
    "mnist-vit": TrainConfig(
        epochs=6, batch_size=64, lr=2e-3, weight_decay=0.05, augment=0, train_images=4000
    ),
}
"""Recipes that learn in seconds on the embedded MNIST (the session's models, ``mnist_models``)."""


def use_recipes(mp: pytest.MonkeyPatch, recipes: Mapping[str, TrainConfig]) -> None:
    """Point the embedded registry entries at ``recipes`` (a changed recipe is its own cache file)."""
    for name, cfg in recipes.items():
        mp.setitem(EMBEDDED, name, dataclasses.replace(EMBEDDED[name], train=cfg))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A private model cache (``$SINAI_CACHE_DIR``) where the embedded models follow
    :data:`SHORT_RECIPES`: trained on first use, once per test module. Modules with other needs define
    their own ``cache``."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        use_recipes(mp, SHORT_RECIPES)
        mp.setenv("SINAI_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def mnist_models() -> dict:
    """Both embedded models trained with :data:`SHORT_RECIPES` (seconds), once per test session."""
    from sinai.models.embedded import train_embedded

    return {name: train_embedded(name, config=cfg, progress=False)[0] for name, cfg in SHORT_RECIPES.items()}


@pytest.fixture(scope="session")
def mnist_images() -> tuple[torch.Tensor, torch.Tensor]:
    """100 class-covering MNIST test images and their labels (seed 0)."""
    from sinai.models.data import mnist, sample

    return sample(mnist("test"), 100, seed=0)


# ------------------------------------------------------------------------------ tiny networks
def images(n: int = 4, shape: tuple[int, ...] = (1, 16, 16), seed: int = 0) -> torch.Tensor:
    """``n`` seeded uniform images of ``shape`` in [0, 1]."""
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def tiny_vit(**kw: object) -> ImageClassifier:
    """A 2-block timm ViT on 1x16x16 images (attention and GeLU sites), in eval mode."""
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, **kw
    )
    return ImageClassifier(net, input_shape=(1, 16, 16), num_classes=10, mean=(0.5,), std=(0.5,)).eval()


def tiny_cnn() -> ImageClassifier:
    """A conv-BN-ReLU + MLP network on 1x16x16 images (ReLU sites), seeded, in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )
    return ImageClassifier(net, input_shape=(1, 16, 16), num_classes=10, mean=(0.5,), std=(0.5,)).eval()


class Counting(nn.Module):
    """Wraps a model and counts every image it forwards (``seen``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.num_classes, self.seen = model, model.num_classes, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.model(x)
