"""PGD adversarial training (mnist-cnn-at and its options) and the transfer surrogate (mnist-cnn-surrogate):
short-recipe AT is more robust than plain training, the recipe is in the cache key, the CLI trains and
reports the time, bad input is one line, and the surrogate never trains on the test split."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import SHORT_RECIPES, use_recipes

from sinai.cli import cli
from sinai.models import embedded, training
from sinai.models.data import mnist
from sinai.models.embedded import (
    EMBEDDED,
    TrainConfig,
    adversarial_name,
    cache_path,
    embedded_metrics,
    embedded_name,
    load_embedded,
    train_embedded,
)
from sinai.models.training import AdvTraining, embedded_split, pgd_robust_accuracy, training_indices
from sinai.models.zoo import load_model

# A short plain recipe and its PGD-AT twin (same data, seed, steps): seconds each on 2 cores.
SHORT = dataclasses.replace(SHORT_RECIPES["mnist-cnn"], train_images=1000)
SHORT_AT = dataclasses.replace(SHORT, adv=AdvTraining("pgd", eps=0.1, steps=2))
# Small enough to exercise the CLI and the cache in a second or two.
TINY_AT = TrainConfig(
    epochs=1, batch_size=64, lr=3e-3, weight_decay=5e-4, augment=0, train_images=128,
    adv=AdvTraining("pgd", eps=0.1, steps=1),
)  # fmt: skip
TINY_SURROGATE = dataclasses.replace(
    EMBEDDED["mnist-cnn-surrogate"].train, epochs=1, augment=0, train_images=256
)


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread in this module: these small batches gain little from two, and on shared
    cores two threads spin-wait (the training fixture took ~80 s instead of ~13 s on a loaded 2-core
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain_and_at():
    """mnist-cnn trained with SHORT and with SHORT_AT (robust accuracy measured on 20 images only)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training, "ROBUST_IMAGES", 20)
        before = torch.random.get_rng_state()
        plain, _ = train_embedded("mnist-cnn", config=SHORT, progress=False)
        at, metrics = train_embedded("mnist-cnn", config=SHORT_AT, progress=False)
        assert torch.equal(torch.random.get_rng_state(), before)
    return plain, at, metrics


def test_pgd_training_is_more_robust_than_plain_training(plain_and_at, mnist_images) -> None:
    plain, at, metrics = plain_and_at
    x, y = mnist_images
    with torch.no_grad():
        clean = (at(x).argmax(1) == y).float().mean().item()
    robust_plain = pgd_robust_accuracy(plain, x, y, eps=0.1, steps=10)
    robust_at = pgd_robust_accuracy(at, x, y, eps=0.1, steps=10)
    assert clean >= 0.8, clean
    assert robust_at >= robust_plain + 0.3, (robust_plain, robust_at)
    assert metrics["adversarial_training"] == {
        "method": "pgd", "eps": 0.1, "steps": 2, "alpha": 0.125, "craft_mode": "eval"
    }  # fmt: skip
    assert metrics["robust_accuracy"]["images"] == 20 and metrics["robust_accuracy"]["steps"] == 20
    assert 0 <= metrics["robust_accuracy"]["accuracy"] <= 1 and metrics["train_seconds"] > 0


def test_recipe_options_are_in_the_cache_key(tmp_path) -> None:
    default = cache_path("mnist-cnn-at", tmp_path)
    others = [cache_path(f"mnist-cnn-at:{o}", tmp_path) for o in ("eps=0.2", "steps=5", "alpha=0.03")]
    assert len({default, *others}) == 4
    assert all(p.name.startswith("mnist-cnn-at-") and p.parent == tmp_path for p in others)
    # the same training spelled differently is the same file and the same canonical name
    assert cache_path("mnist-cnn-at:eps=0.1,steps=10,alpha=0.025", tmp_path) == default
    assert cache_path("mnist-cnn-at:alpha=0.05,eps=0.2", tmp_path) == others[0]
    assert embedded_name("mnist-cnn-at:steps=10,eps=0.1") == "mnist-cnn-at"
    assert embedded_name("mnist-cnn-at:steps=20,eps=0.2") == "mnist-cnn-at:eps=0.2,steps=20"
    assert adversarial_name("mnist-cnn", eps=0.2) == "mnist-cnn-at:eps=0.2"
    assert adversarial_name("mnist-cnn", alpha=0.025) == "mnist-cnn-at"
    # the registered recipe: PGD-10 at linf 0.1, otherwise mnist-cnn's recipe and architecture
    at, base = EMBEDDED["mnist-cnn-at"], EMBEDDED["mnist-cnn"]
    assert at.train.adv == AdvTraining("pgd", eps=0.1, steps=10) and at.train.adv.step_size == 0.025
    assert at.arch == base.arch and dataclasses.replace(at.train, adv=None) == base.train


def test_recipes_without_the_new_fields_keep_their_cache_files(tmp_path) -> None:
    """half and the training methods enter the key only when set: the cached mnist-cnn / mnist-vit files
    stay valid."""
    from sinai.models import data

    for name in ("mnist-cnn", "mnist-vit"):
        entry = EMBEDDED[name]
        train = {
            k: v
            for k, v in dataclasses.asdict(entry.train).items()
            if k not in ("half", *embedded.METHOD_FIELDS)
        }
        recipe = {
            "format": embedded.FORMAT_VERSION,
            "split": [data.MNIST_SPLIT_SEED, data.MNIST_TEST_FRACTION],
            "name": name,
            "arch": type(entry.arch).__name__,
            "arch_params": dataclasses.asdict(entry.arch),
            "train": train,
        }
        key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        assert cache_path(name, tmp_path).name == f"{name}-{key}.pt"


def test_cli_trains_pgd_at_reports_time_and_the_model_loads_by_name(tmp_path, monkeypatch) -> None:
    use_recipes(monkeypatch, {"mnist-cnn-at": TINY_AT})
    monkeypatch.setattr(training, "ROBUST_IMAGES", 10)
    result = run(
        "train", "mnist-cnn", "--adv", "pgd", "--eps", "0.2", "--device", "cpu", "--cache-dir", str(tmp_path)
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # stderr: the progress bar
    assert lines[0].startswith("mnist-cnn-at:eps=0.2: trained in ")
    assert "PGD-1 adversarial training (linf eps 0.2, alpha 0.5)" in lines[0] and "test accuracy" in lines[0]
    assert "evaluate it with: sinai eval --model mnist-cnn-at:eps=0.2" in result.output
    metrics = embedded_metrics("mnist-cnn-at:eps=0.2", cache_dir=tmp_path)
    assert metrics["train_seconds"] > 0 and f"trained in {metrics['train_seconds']} s" in lines[0]
    assert metrics["adversarial_training"]["eps"] == 0.2 and metrics["config"]["adv"]["eps"] == 0.2
    assert embedded_metrics("mnist-cnn-at", cache_dir=tmp_path) is None  # another recipe, another file

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache holds the model")

    monkeypatch.setattr(embedded, "train_embedded", no_training)
    model = load_model("mnist-cnn-at:alpha=0.5,eps=0.2", cache_dir=tmp_path, progress=False)
    assert model.name == "mnist-cnn-at:eps=0.2" and not model.training
    again = run("train", "mnist-cnn-at:eps=0.2", "--device", "cpu", "--cache-dir", str(tmp_path))
    assert again.exit_code == 0 and "loaded from the cache, trained in" in again.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mnist-cnn", "--adv", "fgsm"], "unknown adversarial training method 'fgsm'; choose one of pgd"),
        (["mnist-cnn", "--adv", "pgd", "--eps", "-0.1"], "eps is an l-inf radius in (0, 1], got -0.1"),
        (["mnist-cnn", "--adv", "pgd", "--steps", "0"], "steps must be a positive int, got 0"),
        (["mnist-vit", "--adv", "pgd"], "adversarial training is not available for mnist-vit"),
        (["mnist-cnn", "--eps", "0.2"], "--eps set adversarial training: add --adv pgd"),
        (["mnist-cnn", "--surrogate", "--adv", "pgd"], "--adv and --surrogate are different recipes"),
        (["mnist-vit", "--surrogate"], "no surrogate is registered for mnist-vit"),
        (["mnist-cnn:eps=0.2"], "mnist-cnn takes no ':' options"),
        (["mnist-cnn-at:eps=big"], "eps must be a number, got 'big'"),
        (["mnist-cnn-at:size=3"], "expected eps=..., steps=..., alpha=... after ':'"),
        (["mnist-nope"], "unknown embedded model 'mnist-nope'"),
    ],
)
def test_bad_input_is_one_line(args, message, tmp_path) -> None:
    result = run("train", *args, "--device", "cpu", "--cache-dir", str(tmp_path))
    assert result.exit_code != 0
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ") and message in result.output
    assert list(tmp_path.iterdir()) == []  # nothing trained


def test_surrogate_trains_only_on_half_of_the_train_split() -> None:
    train_idx, test_idx = embedded_split()
    used = training_indices("mnist-cnn-surrogate")
    assert len(used) == len(train_idx) // 2 == 2000
    assert not set(used.tolist()) & set(test_idx.tolist())
    assert set(used.tolist()) <= set(train_idx.tolist())
    assert set(training_indices("mnist-cnn").tolist()) == set(train_idx.tolist())
    # by content too: none of its training images is an evaluation (test split) image
    train, test = mnist("train"), mnist("test")
    position = {int(i): p for p, i in enumerate(train_idx.tolist())}
    seen = train.load(torch.tensor([position[int(i)] for i in used]))
    test_images = {bytes(t.numpy().tobytes()) for t in test.load(torch.arange(len(test)))}
    assert not any(bytes(s.numpy().tobytes()) in test_images for s in seen)
    # a different network from mnist-cnn's: other widths, other seed
    sur, base = EMBEDDED["mnist-cnn-surrogate"], EMBEDDED["mnist-cnn"]
    assert sur.arch != base.arch and sur.train.seed != base.train.seed and sur.train.half == 1


def test_surrogate_is_loadable_by_name_and_from_the_cli(tmp_path, monkeypatch, mnist_images) -> None:
    half = set(training_indices("mnist-cnn-surrogate").tolist())
    use_recipes(monkeypatch, {"mnist-cnn-surrogate": TINY_SURROGATE})
    short = set(training_indices("mnist-cnn-surrogate").tolist())
    assert len(short) == TINY_SURROGATE.train_images and short <= half  # a subset of the same half
    result = run("train", "mnist-cnn", "--surrogate", "--device", "cpu", "--cache-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("mnist-cnn-surrogate: trained in ")
    model = load_embedded("mnist-cnn-surrogate", cache_dir=tmp_path, progress=False)
    same = load_model("mnist-cnn-surrogate", cache_dir=tmp_path, progress=False)
    assert model.name == same.name == "mnist-cnn-surrogate"
    assert model.net.features[0].out_channels == 32
    x, _ = mnist_images
    with torch.no_grad():
        assert torch.equal(model(x), same(x))


def test_the_new_models_are_in_the_zoo_without_training(tmp_path, monkeypatch) -> None:
    from sinai.models.zoo import default_dataset, list_models

    monkeypatch.setenv("SINAI_CACHE_DIR", str(tmp_path))
    assert {"mnist-cnn-at", "mnist-cnn-surrogate"} <= set(list_models())
    assert default_dataset("mnist-cnn-at:eps=0.2") == default_dataset("mnist-cnn-surrogate") == "mnist"
    result = run("sites", "--model", "mnist-cnn-at:eps=0.2")  # sites need no weights: nothing trains
    assert result.exit_code == 0 and "relu" in result.stdout and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown model 'mnist-cnn-surrogate:eps=0.2'"):
        load_model("mnist-cnn-surrogate:eps=0.2")
