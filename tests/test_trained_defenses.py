"""The trained defenses end to end: ``sinai train --mfdv / --selective`` through the embedded-model cache,
their checkpoints loaded with ``load_model`` and defended with the presets, the attacks and the report's
seed 001 tables (BitOPs, the ratio sweep)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import use_recipes

from sinai import protect
from sinai.cli import cli
from sinai.cli.models import resolve_train_name
from sinai.models import embedded, training
from sinai.models.embedded import EMBEDDED, TrainConfig, cache_path, embedded_metrics
from sinai.models.mfdv import MfdvTraining
from sinai.models.selective import SelectiveTraining
from sinai.models.training import AdvTraining
from sinai.models.zoo import load_model

TINY = dict(epochs=1, batch_size=64, lr=3e-3, weight_decay=5e-4, augment=0, train_images=256)
RECIPES = {
    "mnist-cnn": TrainConfig(**TINY),
    "mnist-cnn-mfdv": TrainConfig(**TINY, mfdv=MfdvTraining(lambda1=1e-3)),
    "mnist-cnn-at": TrainConfig(**TINY, adv=AdvTraining("pgd", eps=0.1, steps=1)),
    "mnist-cnn-selective": TrainConfig(
        **{**TINY, "lr": 3e-4}, selective=SelectiveTraining(distill_epochs=1, distill_lr=1e-2)
    ),
}


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private model cache where the tiny recipes above stand for the registered ones."""
    folder = tmp_path_factory.mktemp("cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        use_recipes(mp, RECIPES)
        mp.setattr(training, "ROBUST_IMAGES", 10)
        yield folder
    torch.set_num_threads(threads)


def test_train_flags_name_the_variant() -> None:
    assert resolve_train_name("mnist-cnn", None, None, None, None, False, mfdv=True) == "mnist-cnn-mfdv"
    assert (
        resolve_train_name("mnist-cnn", None, None, None, None, False, mfdv=True, lambda1=0.003)
        == "mnist-cnn-mfdv:lambda1=0.003"
    )
    assert resolve_train_name("mnist-vit", None, None, None, None, False, mfdv=True) == "mnist-vit-mfdv"
    assert (
        resolve_train_name("mnist-cnn", None, None, None, None, False, selective=True, k=8)
        == "mnist-cnn-selective:k=8"
    )
    # a variant's own name takes its options without the flag; the registered value drops out
    assert (
        resolve_train_name("mnist-cnn-mfdv", None, None, None, None, False, lambda1=0.001) == "mnist-cnn-mfdv"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lambda1": 0.1}, "--lambda1 is an option of --mfdv: add --mfdv"),
        ({"k": 4}, "--k is an option of --selective: add --selective"),
        ({"mfdv": True, "selective": True}, "--mfdv and --selective are different recipes"),
        ({"mfdv": True, "eps": 0.2}, "--eps are options of --adv pgd, not of --mfdv"),
    ],
)
def test_train_flags_that_mean_nothing_are_one_line(kwargs, message) -> None:
    args = {"adv": None, "eps": None, "steps": None, "alpha": None, "surrogate": False}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(ValueError, match=message):
        resolve_train_name("mnist-cnn", *args.values(), **kwargs)


def test_selective_is_not_offered_for_the_vit() -> None:
    with pytest.raises(ValueError, match="--selective is not available for mnist-vit"):
        resolve_train_name("mnist-vit", None, None, None, None, False, selective=True)
    result = CliRunner().invoke(cli, ["train", "mnist-vit", "--selective"])
    assert result.exit_code != 0 and "not available for mnist-vit" in result.output
    assert "Traceback" not in result.output


def test_selective_cache_key_follows_its_base_recipe(monkeypatch) -> None:
    before = cache_path("mnist-cnn-selective").name
    at = EMBEDDED["mnist-cnn-at"]
    changed = dataclasses.replace(at.train, adv=AdvTraining("pgd", eps=0.1, steps=3))
    monkeypatch.setitem(EMBEDDED, "mnist-cnn-at", dataclasses.replace(at, train=changed))
    assert cache_path("mnist-cnn-selective").name != before  # a retrained base retrains the variant


def test_sinai_train_mfdv_caches_a_checkpoint_the_preset_reads(cache, mnist_images) -> None:
    result = run("train", "mnist-cnn", "--mfdv", "--cache-dir", str(cache), "--device", "cpu")
    assert "mnist-cnn-mfdv: trained in" in result.output and "MFDV-SNN, lambda1 0.001" in result.output
    metrics = embedded_metrics("mnist-cnn-mfdv", cache_dir=cache)
    assert metrics["mfdv"]["lambda1"] == 1e-3 and metrics["sigma_mean"] != pytest.approx(
        metrics["sigma_init_mean"], abs=1e-4
    )  # sigma was trained
    model = load_model("mnist-cnn-mfdv", cache_dir=cache)
    sigma = model.net.head.mfdv_log_sigma.detach().exp()
    x, _ = mnist_images
    defended = protect(model, "MFDV:mc=3", seed=0)
    assert torch.allclose(torch.tensor(defended.defense.specs["feature"].std), sigma)
    assert defended.defense.mc == 3
    with torch.no_grad():
        a, b = defended(x[:8]), defended(x[:8])
        with defended.clean():
            exact = defended(x[:8])
    assert not torch.equal(a, b)  # noisy
    assert torch.equal(exact, model(x[:8]))  # .clean() is the sigma = 0 network
    again = run("train", "mnist-cnn", "--mfdv", "--cache-dir", str(cache), "--device", "cpu")
    assert "loaded from the cache" in again.output


def test_selective_trains_from_its_base_in_the_same_cache_and_evaluates(cache, tmp_path) -> None:
    result = run("train", "mnist-cnn", "--selective", "--cache-dir", str(cache), "--device", "cpu")
    assert "mnist-cnn-selective: trained in" in result.output
    assert cache_path("mnist-cnn-at", cache).is_file()  # the base was trained into the same cache
    metrics = embedded_metrics("mnist-cnn-selective", cache_dir=cache)
    assert metrics["base"] == "mnist-cnn-at" and set(metrics["selective_test_accuracy"]) >= {"0.9"}

    out = tmp_path / "runs"
    common = ["--model", "mnist-cnn-selective", "--cache-dir", str(cache), "--images", "20"]
    common += ["--budget", "50", "--out", str(out), "--device", "cpu"]
    for defense, extra in (
        ("none", []),
        ("SINAI-selective:ratio=0.9", []),
        ("SINAI-selective:ratio=0.9", ["--bpda"]),
    ):
        result = run("eval", *common, "--defense", defense, "--attack", "pgd", *extra)
        assert "wall time" in result.output, result.output
    report = run("report", str(out))
    assert "table6" in report.output and "BitOPs" in report.output
    table6 = json.loads((out / "report" / "table6.json").read_text())
    rows = {row["method"]: row for row in table6["rows"]}
    exact, mixed = rows["Base"], rows["SINAI-selective(approx ratio=0.9)"]
    assert exact["r"] == 0 and mixed["r"] == pytest.approx(90)
    assert exact["BitOPs -%"] == pytest.approx(0) and mixed["BitOPs -%"] > 50
    assert "PGD-20" in mixed and "PGD-20 BPDA" in mixed
    whitebox = json.loads((out / "report" / "whitebox.json").read_text())
    assert "BitOPs (G)" in whitebox["columns"]


def test_preset_on_the_wrong_checkpoint_is_one_line(cache) -> None:
    plain = embedded.build_embedded("mnist-cnn")
    with pytest.raises(ValueError, match="sinai train mnist-cnn --mfdv"):
        protect(plain, "MFDV")
    with pytest.raises(ValueError, match="sinai train mnist-cnn --selective"):
        protect(plain, "SINAI-selective")


def test_demo_trained_adds_the_trained_defenses(cache, tmp_path) -> None:
    use = (
        "--quick",
        "--workers",
        "1",
        "--models",
        "mnist-cnn",
        "--attacks",
        "square",
        "--images",
        "10",
        "--budget",
        "20",
    )
    out = tmp_path / "demo"
    result = run("demo", *use, "--trials", "2", "--trained", "--out", str(out), "--cache-dir", str(cache))
    assert result.exit_code == 0, result.output
    rows = [line.split("|")[2].strip() for line in result.output.splitlines() if line.startswith("| mnist-")]
    assert any(row.startswith("SINAI-selective") for row in rows) and any(
        row.startswith("MFDV") for row in rows
    )
    assert "load or train its mfdv variant mnist-cnn-mfdv" in result.output
    whitebox_free = json.loads((out / "report" / "table1.json").read_text())  # query attacks only: no BitOPs
    assert not any("BitOPs" in c for c in whitebox_free["columns"])


LIGHT_ARGS = {  # every attack with the least work that still runs its algorithm
    "pgd": {"steps": 2}, "mifgsm": {"steps": 2}, "eotpgd": {"steps": 2, "eot_iter": 2},
    "cw": {"steps": 5, "binary_search_steps": 1}, "npixel": {"steps": 1, "popsize": 2},
    "transfer": {"queries": 10},
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "defense"), [("mnist-cnn-mfdv", "MFDV:mc=2"), ("mnist-cnn-selective", None)]
)
def test_every_attack_runs_on_the_trained_defenses(cache, mnist_images, name, defense) -> None:
    from sinai.attacks import ATTACKS, ThreatModel, attack_class
    from sinai.defenses import parse_defense
    from sinai.evaluation.config import EvalConfig
    from sinai.evaluation.protocol import evaluate

    if name == "mnist-cnn-selective":
        run("train", "mnist-cnn", "--selective", "--cache-dir", str(cache), "--device", "cpu")
        defense = "SINAI-selective:ratio=0.9"
    else:
        run("train", "mnist-cnn", "--mfdv", "--cache-dir", str(cache), "--device", "cpu")
    model = load_model(name, cache_dir=cache)
    x, y = mnist_images
    for attack in ATTACKS:
        if attack == "autoattack":
            continue  # minutes even on 2 images; its wrapper is tested in test_attacks_whitebox
        norms = attack_class(attack).norms
        threat = ThreatModel("linf", 0.1) if "linf" in norms else ThreatModel("l2", 1.5)
        config = EvalConfig(
            attack=attack, attack_args=LIGHT_ARGS.get(attack, {}), defense=parse_defense(defense),
            threat=threat, budgets=(20,), seed=0, passes=1,
        )  # fmt: skip
        result = evaluate(model, x[:2], y[:2], config, progress=False)
        assert len(result.results) == 2, attack
