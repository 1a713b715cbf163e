"""Embedded MNIST models: structure (noise sites exist), short training learns, caching, full recipes."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import SHORT_RECIPES, use_recipes
from timm.layers import Attention, Mlp
from torch import nn

from sinai.models import embedded
from sinai.models.classifier import ImageClassifier
from sinai.models.embedded import (
    EMBEDDED,
    TrainConfig,
    build_embedded,
    cache_path,
    embedded_metrics,
    load_embedded,
    train_embedded,
)

NAMES = ("mnist-cnn", "mnist-vit")

# The short recipes (conftest) learn reliably in seconds. Chance is 10%; a model that does not learn
# (or is evaluated wrongly) stays far below these.
SHORT_THRESHOLD = {"mnist-cnn": 0.9, "mnist-vit": 0.6}
# A training run small enough to exercise the cache in about a second.
TINY = TrainConfig(epochs=1, batch_size=64, lr=3e-3, weight_decay=5e-4, seed=0, augment=0, train_images=256)


@pytest.fixture
def tiny_cnn(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the ``mnist-cnn`` registry entry at a tiny recipe so that caching tests train in a second."""
    use_recipes(monkeypatch, {"mnist-cnn": TINY})
    return "mnist-cnn"


def test_cnn_has_relu_batchnorm_and_linear_head() -> None:
    model = build_embedded("mnist-cnn")
    assert isinstance(model, ImageClassifier) and model.name == "mnist-cnn"
    assert model.input_shape == (1, 28, 28) and model.num_classes == 10
    modules = list(model.modules())
    assert sum(isinstance(m, nn.ReLU) for m in modules) >= 4
    assert any(isinstance(m, nn.BatchNorm2d) for m in modules)
    assert isinstance(model.net.head, nn.Linear) and model.net.head.out_features == 10
    # every ReLU is its own module (defenses hook each call site separately)
    relus = [m for m in modules if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == len(relus)
    assert model.eval()(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_vit_is_timm_with_attention_and_gelu_mlps() -> None:
    model = build_embedded("mnist-vit")
    assert isinstance(model, ImageClassifier) and model.name == "mnist-vit"
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, Mlp)]
    assert len(attns) == len(mlps) == len(model.net.blocks) >= 2
    assert all(isinstance(m.act, nn.GELU) for m in mlps)
    assert "attn_mask" in inspect.signature(Attention.forward).parameters
    assert model.net.cls_token is not None
    assert isinstance(model.net.head, nn.Linear) and model.net.head.out_features == 10
    assert model.eval()(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_random_shift_moves_images_within_bounds() -> None:
    x = torch.zeros(64, 1, 28, 28)
    x[:, 0, 14, 14] = 1.0
    shifted = embedded._random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), torch.ones(64))  # nothing lost, nothing added
    where = shifted[:, 0].flatten(1).argmax(1)
    ys, xs = where // 28, where % 28
    assert (ys - 14).abs().max() <= 2 and (xs - 14).abs().max() <= 2
    assert len(set(zip(ys.tolist(), xs.tolist(), strict=True))) > 10  # shifts vary per image


def test_unknown_name_lists_known(tmp_path) -> None:
    for call in (
        lambda: build_embedded("mnist-nope"),
        lambda: train_embedded("mnist-nope", progress=False),
        lambda: load_embedded("mnist-nope", cache_dir=tmp_path, progress=False),
        lambda: embedded_metrics("mnist-nope", cache_dir=tmp_path),
    ):
        with pytest.raises(
            ValueError, match="unknown embedded model 'mnist-nope'; known: mnist-cnn, mnist-vit"
        ):
            call()


@pytest.mark.parametrize("name", NAMES)
def test_short_training_learns_and_leaves_global_rng_alone(name: str) -> None:
    before = torch.random.get_rng_state()
    model, metrics = train_embedded(name, config=SHORT_RECIPES[name], progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not model.training
    assert metrics["test_accuracy"] >= SHORT_THRESHOLD[name], metrics
    assert metrics["epochs"] == SHORT_RECIPES[name].epochs and metrics["train_seconds"] > 0
    assert metrics["test_images"] == 1000


def test_training_is_reproducible() -> None:
    a, _ = train_embedded("mnist-cnn", config=TINY, progress=False)
    b, _ = train_embedded("mnist-cnn", config=TINY, progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_load_embedded_trains_once_then_reads_the_cache(tiny_cnn, tmp_path, monkeypatch, capsys) -> None:
    assert embedded_metrics(tiny_cnn, cache_dir=tmp_path) is None
    first = load_embedded(tiny_cnn, cache_dir=tmp_path, progress=True)
    path = cache_path(tiny_cnn, tmp_path)
    assert path.is_file() and path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    err = capsys.readouterr().err
    assert "training mnist-cnn once" in err and str(path) in err
    metrics = embedded_metrics(tiny_cnn, cache_dir=tmp_path)
    assert metrics is not None and 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["train_images"] == 256

    def no_training(*args, **kwargs):
        raise AssertionError("load_embedded retrained although the cache holds the model")

    monkeypatch.setattr(embedded, "train_embedded", no_training)
    second = load_embedded(tiny_cnn, cache_dir=tmp_path, progress=True)
    assert capsys.readouterr().err == ""
    assert not second.training
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_recipe_change_changes_cache_file(tiny_cnn, tmp_path, monkeypatch) -> None:
    path = cache_path(tiny_cnn, tmp_path)
    other = dataclasses.replace(EMBEDDED[tiny_cnn], train=dataclasses.replace(TINY, seed=1))
    monkeypatch.setitem(EMBEDDED, tiny_cnn, other)
    assert cache_path(tiny_cnn, tmp_path) != path
    assert cache_path(tiny_cnn, tmp_path).name.startswith("mnist-cnn-")


def test_corrupt_cache_is_retrained_and_replaced(tiny_cnn, tmp_path) -> None:
    path = cache_path(tiny_cnn, tmp_path)
    path.write_bytes(b"not a torch file")
    assert embedded_metrics(tiny_cnn, cache_dir=tmp_path) is None
    with pytest.warns(UserWarning, match="unreadable"):
        model = load_embedded(tiny_cnn, cache_dir=tmp_path, progress=False)
    assert embedded_metrics(tiny_cnn, cache_dir=tmp_path) is not None
    again = load_embedded(tiny_cnn, cache_dir=tmp_path, progress=False)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_retrain_overwrites(tiny_cnn, tmp_path) -> None:
    load_embedded(tiny_cnn, cache_dir=tmp_path, progress=False)
    path = cache_path(tiny_cnn, tmp_path)
    stamp = path.stat().st_mtime_ns
    load_embedded(tiny_cnn, cache_dir=tmp_path, progress=False, retrain=True)
    assert path.stat().st_mtime_ns != stamp


@pytest.mark.slow
def test_full_recipes_hit_their_targets(tmp_path) -> None:
    """The shipped recipes: >= 97% (CNN) and >= 93% (ViT) on the 1000 test images, checked after caching."""
    from sinai.models.data import mnist

    test = mnist("test")
    x, y = test.load(torch.arange(len(test))), test.labels
    for name, target in (("mnist-cnn", 0.97), ("mnist-vit", 0.93)):
        load_embedded(name, cache_dir=tmp_path, progress=False)
        model = load_embedded(name, cache_dir=tmp_path, progress=False)  # read back from the cache
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        assert accuracy >= target, (name, accuracy)
        assert embedded_metrics(name, cache_dir=tmp_path)["test_accuracy"] == pytest.approx(accuracy)


def test_train_config_rejects_bad_values() -> None:
    good = {"epochs": 1, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.0}
    for bad, match in (
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"augment": -1}, "augment"),
        ({"train_images": 0}, "train_images"),
    ):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{**good, **bad})
