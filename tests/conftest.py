"""Shared test options: slow checks run only with --runslow, GPU checks only where CUDA exists."""

import pytest
import torch


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


SHORT_RECIPES = {
    "mnist-cnn": dict(epochs=2, batch_size=64, lr=3e-3, weight_decay=5e-4, augment=0, train_images=2000),
    "mnist-vit": dict(epochs=6, batch_size=64, lr=2e-3, weight_decay=0.05, augment=0, train_images=4000),
}


@pytest.fixture(scope="session")
def mnist_models() -> dict:
    """Both embedded models trained with a short recipe (seconds), once per test session."""
    from sinai.models.embedded import TrainConfig, train_embedded

    return {
        name: train_embedded(name, config=TrainConfig(**cfg), progress=False)[0]
        for name, cfg in SHORT_RECIPES.items()
    }


@pytest.fixture(scope="session")
def mnist_images() -> tuple[torch.Tensor, torch.Tensor]:
    """100 class-covering MNIST test images and their labels (seed 0)."""
    from sinai.models.data import mnist, sample

    return sample(mnist("test"), 100, seed=0)
