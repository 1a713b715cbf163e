"""Calibration hits its target; tuning keeps to its constraint, resumes from SQLite, refuses bad input."""

from __future__ import annotations

import math

import pytest
import torch

from sinai.attacks.threat import ThreatModel
from sinai.defenses import parse_defense, preset, protect
from sinai.evaluation.clean import clean_accuracy
from sinai.evaluation.store import ResultStore
from sinai.tuning import calibrate as calibrate_module
from sinai.tuning import tune as tune_module
from sinai.tuning.calibrate import bisect_std, calibrate
from sinai.tuning.pareto import dominates, pareto_front, pareto_mask
from sinai.tuning.tune import Fidelity, check_space, defense_from_params, parse_ranges, search_space, tune


@pytest.fixture(scope="module")
def val(mnist_images) -> tuple[torch.Tensor, torch.Tensor]:
    return mnist_images


# ------------------------------------------------------------------------------------ calibration
@pytest.mark.parametrize("defense, target", [("RND", 0.02), ("FND", 0.01)])
def test_calibration_hits_its_target(mnist_models, val, defense, target) -> None:
    model = mnist_models["mnist-cnn"]
    x, y = val
    c = calibrate(model, x, y, preset(defense), drop=target, tolerance=0.005, seed=3)
    assert c.reached, c.steps
    assert abs(c.drop - target) <= 0.005
    assert c.std > 0 and c.defense.specs[c.kind].std == c.std
    # The reported drop is what protect() with that std really costs (same seed, same images).
    base = clean_accuracy(model, x, y, passes=1).mean
    defended = protect(model, c.defense, seed=3)
    measured = clean_accuracy(defended, x, y, passes=3).mean
    defended.remove()
    assert c.base == pytest.approx(base)
    assert base - measured == pytest.approx(c.drop, abs=1e-9)


def test_calibration_says_when_the_range_is_too_small(mnist_models, val) -> None:
    x, y = val
    c = calibrate(mnist_models["mnist-cnn"], x, y, preset("RND"), drop=0.05, high=1e-4, tolerance=0.01)
    assert not c.reached and c.std == 1e-4 and len(c.steps) == 1


def test_calibration_rejects_bad_input(mnist_models, val) -> None:
    model = mnist_models["mnist-vit"]
    x, y = val
    for kwargs, message in [
        ({"drop": 0.0}, "drop"),
        ({"drop": 1.0}, "drop"),
        ({"drop": 0.01, "low": 0.5, "high": 0.1}, "low < high"),
        ({"drop": 0.01, "tolerance": 0.02}, "tolerance"),
    ]:
        with pytest.raises(ValueError, match=message):
            calibrate(model, x, y, preset("RND"), **kwargs)
    with pytest.raises(ValueError, match="one std"):
        calibrate(model, x, y, preset("SINAI"), drop=0.01)
    with pytest.raises(ValueError, match=r"needs \['attn'\] sites"):
        calibrate(mnist_models["mnist-cnn"], x, y, parse_defense("SINAI-Attn"), drop=0.01)


def test_calibration_bisection_is_monotone_in_its_steps(mnist_models, val, monkeypatch) -> None:
    """Each bisection step halves the bracket: lows only rise, highs only fall."""
    x, y = val
    c = calibrate(mnist_models["mnist-cnn"], x, y, preset("RND"), drop=0.03, tolerance=0.001, max_steps=6)
    assert len(c.steps) <= 6
    stds = [s for s, _ in c.steps]
    assert stds[0] == calibrate_module.DEFAULT_HIGH["input"]
    gaps = [abs(b - a) for a, b in zip(stds[1:], stds[2:], strict=False)]
    assert all(g2 <= g1 / 2 + 1e-12 for g1, g2 in zip(gaps, gaps[1:], strict=False))


def test_bisect_std_narrows_to_where_enough_starts() -> None:
    lo, hi = bisect_std(lambda s: s >= 0.3, 0.0, 1.0, steps=20)
    assert lo < 0.3 <= hi and hi - lo <= 2**-20
    lo, hi = bisect_std(lambda s: s >= 0.3, 1e-3, 8.0, steps=30, log=True)
    assert lo < 0.3 <= hi and hi / lo < 1.001
    seen: list[float] = []
    bisect_std(lambda s: seen.append(s) or s >= 0.3, 0.0, 1.0, steps=10, stop=lambda: len(seen) >= 2)
    assert seen == [0.5, 0.25]


def test_pareto_front_keeps_every_undominated_point() -> None:
    points = [(0.9, 0.1), (0.8, 0.5), (0.8, 0.4), (0.7, 0.5), (0.9, 0.1)]
    assert pareto_mask(points) == [True, True, False, False, True]
    assert pareto_front(list(range(5)), key=lambda i: points[i]) == [0, 1, 4]
    assert dominates((1, 1), (1, 0)) and not dominates((1, 0), (1, 0)) and not dominates((0, 2), (1, 0))


# ----------------------------------------------------------------------------------------- tuning
SMALL = dict(
    trials=4, population=2, passes=2, screen=Fidelity(12, 15), full=Fidelity(15, 30),
    threat=ThreatModel("linf", 0.1), seed=0, progress=False,
)  # fmt: skip


def test_search_space_has_only_the_models_kinds(mnist_models) -> None:
    assert set(search_space(mnist_models["mnist-cnn"], "mnist-cnn")) == {"relu.std", "relu.ratio"}
    vit = search_space(mnist_models["mnist-vit"], "mnist-vit")
    assert set(vit) == {"attn.std", "gelu.std", "gelu.ratio"}
    assert search_space(mnist_models["mnist-vit"])["attn.std"] == (0.0, 2.0)  # the paper's ViT range
    with pytest.raises(ValueError, match="no relu sites"):
        search_space(mnist_models["mnist-vit"], overrides={"relu.std": (0, 1)})
    d = defense_from_params({"gelu.std": 0.2, "gelu.ratio": 0.5, "attn.std": 1.0})
    assert d.specs["gelu"].ratio == 0.5 and d.specs["attn"].ratio == 1.0 and d.name == "SINAI"


def test_bad_search_ranges_and_settings_are_refused(mnist_models, val, tmp_path) -> None:
    with pytest.raises(ValueError, match="low <= high"):
        check_space({"attn.std": (1.0, 0.5)})
    with pytest.raises(ValueError, match="unknown decision variable"):
        check_space({"input.std": (0, 1)})
    with pytest.raises(ValueError, match="low:high"):
        parse_ranges("attn.std=1")
    x, y = val
    model = mnist_models["mnist-cnn"]
    storage = f"sqlite:///{tmp_path / 's.sqlite'}"
    for kwargs, message in [
        ({"deltas": (0.0,)}, "delta"),
        ({"deltas": (1.0,)}, "delta"),
        ({"trials": 0}, "trials"),
    ]:
        with pytest.raises(ValueError, match=message):
            tune(model, x, y, storage=storage, **(SMALL | kwargs))
    with pytest.raises(ValueError, match="cannot open Optuna storage"):
        tune(model, x, y, storage="sqlite:////nonexistent-dir/x/y.sqlite", **SMALL)
    with pytest.raises(ValueError, match="cannot open Optuna storage"):
        tune(model, x, y, storage="nosuchdb://nowhere", **SMALL)


def test_tuning_returns_only_configurations_that_meet_the_constraint(mnist_models, val, tmp_path) -> None:
    x, y = val
    model = mnist_models["mnist-cnn"]
    deltas = (0.01, 0.03)
    result = tune(
        model, x, y, deltas=deltas, model_name="mnist-cnn", storage=f"sqlite:///{tmp_path / 's.sqlite'}",
        store=ResultStore(tmp_path / "r.sqlite"), **SMALL,
    )  # fmt: skip
    assert len(result.trials) == SMALL["trials"]
    base = clean_accuracy(model, x, y, passes=1).mean
    assert result.base == pytest.approx(base)
    for t in result.trials:  # infeasible trials cost no attack
        assert math.isnan(t.robust) == (t.clean < base - max(deltas))
    assert all(t.clean >= base - max(deltas) for t in result.pareto)
    for d, chosen in result.chosen.items():
        if chosen is not None:  # None means no trial met this delta, which tune says explicitly
            assert chosen.drop <= d and chosen.robust_full is not None
            # The chosen defense really costs what the trial measured (same seed and images).
            defended = protect(model, chosen.defense(), seed=0)
            assert clean_accuracy(defended, x, y, passes=2).mean == pytest.approx(chosen.clean)
            defended.remove()


def test_a_killed_tuning_run_resumes_from_its_study(mnist_models, val, tmp_path, monkeypatch) -> None:
    x, y = val
    model = mnist_models["mnist-cnn"]
    storage = f"sqlite:///{tmp_path / 'study.sqlite'}"
    real = tune_module.clean_accuracy
    calls = {"n": 0}

    def dies_on_the_fourth_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # call 1 is the base accuracy, 2-3 are trials 0-1: die inside trial 2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "clean_accuracy", dies_on_the_fourth_call)
    with pytest.raises(KeyboardInterrupt):
        tune(model, x, y, storage=storage, model_name="mnist-cnn", **SMALL)
    monkeypatch.setattr(tune_module, "clean_accuracy", real)

    import optuna

    study = optuna.load_study(study_name="sinai", storage=storage)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 2
    before = {t.number: t.params for t in finished}
    (stopped,) = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]  # ctrl-C: failed

    result = tune(model, x, y, storage=storage, model_name="mnist-cnn", **SMALL)
    assert len(result.trials) == SMALL["trials"]
    assert {t.number: dict(t.params) for t in result.trials if t.number in before} == before
    # The stopped trial's parameters are asked again (first, before any new trial), not dropped.
    assert result.trials[2].number == stopped.number + 1 and dict(result.trials[2].params) == stopped.params

    # The same study name with another search space is refused, not silently mixed.
    with pytest.raises(ValueError, match="other settings"):
        tune(
            model, x, y, storage=storage, model_name="mnist-cnn", space={"relu.std": (0.0, 0.1)}, **SMALL
        )  # fmt: skip
