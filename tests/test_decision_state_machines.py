"""Query attacks as per-image state machines: every oracle call asks every live image, and each image
makes exactly the queries it makes when attacked alone (deterministic models)."""

import math

import pytest
import torch
from test_attacks_decision import Linear3

from sinai.attacks import attack_class, make_attack
from sinai.attacks.geoda import _Run as _GeoRun
from sinai.attacks.geoda import dct_rows
from sinai.attacks.oracle import Oracle, QueryRules
from sinai.attacks.phases import START_GROUP, START_SINGLE
from sinai.attacks.threat import ThreatModel

MACHINES = ("hsja", "signopt", "boundary", "geoda", "signflip")
SCORE_MACHINES = ("simba", "simba-dct")
NORM = {**dict.fromkeys(MACHINES + SCORE_MACHINES, "l2"), "signflip": "linf"}
STARTS = ("hsja", "boundary", "geoda", "signflip")  # the machines that start from random images


class Recording(Oracle):
    """Records, per call, the images asked and the images still live."""

    def __call__(self, x, idx):
        self.calls.append((set(idx.tolist()), set(torch.nonzero(~self.done).flatten().tolist())))
        return super().__call__(x, idx)


def run(name, x, y, model, budget=300, **kwargs):
    eps = 0.3 if NORM[name] == "l2" else 0.05  # small: the attacks run their full course
    oracle = Recording(
        model, x, y, threat=ThreatModel(NORM[name], eps), rules=QueryRules(budget=budget, votes=0),
        output=attack_class(name).output,
    )  # fmt: skip
    oracle.calls = []
    x_adv = make_attack(name, **kwargs)(oracle, seed=3)
    return oracle, x_adv


class Bright(torch.nn.Module):
    """Two classes: 1 where the mean of the top two rows is above ``level``. Dark images are class 0,
    and few noise images are bright enough there to be adversarial, so random starts take a varying
    number of tries."""

    def __init__(self, level: float = 0.7):
        super().__init__()
        self.level, self.num_classes, self.input_shape = level, 2, (1, 8, 8)
        self.scale = torch.nn.Parameter(torch.tensor(100.0, dtype=torch.float64))  # (the oracle wants one)

    def forward(self, x):
        z = (x[:, :, :2].flatten(1).double().mean(1) - self.level) * self.scale
        return torch.stack([torch.zeros_like(z), z], 1).float()


def assert_same_alone(name, x, y, model, before_alone=lambda i: None):
    """Each image's queries, success time and adversarial are the same attacked alone as in the batch."""
    together, adv_together = run(name, x, y, model)
    for i in range(len(x)):
        before_alone(i)
        alone, adv_alone = run(name, x[i : i + 1], y[i : i + 1], model)
        assert int(alone.queries[0]) == int(together.queries[i])
        assert int(alone.success_at[0]) == int(together.success_at[i])
        assert torch.equal(adv_alone[0], adv_together[i])


def setup(n=6, seed=1):
    torch.manual_seed(0)
    model = Linear3(seed=seed)
    x = torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("name", MACHINES + SCORE_MACHINES)
def test_every_call_asks_every_live_image(name):
    model, x, y = setup()
    oracle, _ = run(name, x, y, model)
    assert len(oracle.calls) > 10
    full = [asked == live for asked, live in oracle.calls]
    assert all(full), f"{full.count(False)} of {len(full)} calls left live images out"


@pytest.mark.parametrize("name", MACHINES)
def test_each_image_makes_the_queries_it_makes_alone(name):
    model, x, y = setup(n=4, seed=2)
    assert_same_alone(name, x, y, model)


def test_hsja_stops_after_max_iter_iterations():
    model, x, y = setup(n=3)
    one, _ = run("hsja", x, y, model, budget=10_000, max_iter=1)
    two, _ = run("hsja", x, y, model, budget=10_000, max_iter=2)
    # iteration 2 adds sqrt(2) * 100 = 141 probes per image, plus its step and line searches
    assert (one.queries < 10_000).all() and (two.queries - one.queries >= 141).all()


def test_dct_rows_are_orthonormal_low_frequencies():
    rows = dct_rows(28, 10)
    assert torch.allclose(rows @ rows.T, torch.eye(10), atol=1e-5)
    assert torch.allclose(rows[0], torch.full((28,), 28**-0.5))  # the constant, then rising frequencies
    full = dct_rows(8, 8)
    assert torch.allclose(full.T @ full, torch.eye(8), atol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_geoda_probes_lie_in_the_low_frequency_subspace(ratio):
    x = torch.rand(2, 1, 16, 16)
    model = Linear3(shape=(1, 16, 16))
    oracle = Oracle(model, x, torch.zeros(2, dtype=torch.long), threat=ThreatModel("l2", 1.0),
                    rules=QueryRules(budget=100, votes=0), output="labels")  # fmt: skip
    state = _GeoRun(make_attack("geoda", dct_ratio=ratio, sigma=1.0), oracle, x, oracle.labels, 0)
    eta = state.probes(torch.tensor([0, 1]), 500)  # (2, 500, 1, 16, 16)
    k = math.ceil(ratio * 16)
    rows = dct_rows(16, 16)
    coeffs = rows @ eta @ rows.T  # back to DCT coefficients
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[:k, :k] = False
    assert (coeffs[..., outside].abs() < 1e-4).all()
    kept = coeffs[..., :k, :k]
    assert (
        abs(kept.std().item() - 1) < 0.05 and abs(kept.mean().item()) < 0.05
    )  # N(0, sigma^2) per coefficient


def test_geoda_rejects_a_bad_dct_ratio():
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="dct_ratio must be"):  # in (0, 1] / a finite number (True)
            make_attack("geoda", dct_ratio=bad)


@pytest.mark.parametrize("name", SCORE_MACHINES)
def test_simba_each_image_makes_the_queries_it_makes_alone(name, monkeypatch):
    """With its own row of the direction order (drawn once for the whole batch), an image asks alone
    exactly what it asks in the batch."""
    model, x, y = setup(n=4, seed=2)
    cls = attack_class(name)
    order = cls._order(make_attack(name), len(x), x.shape[1:], torch.Generator().manual_seed(0), x.device)
    rows = order
    monkeypatch.setattr(cls, "_order", lambda self, n, *args, **kwargs: rows)

    def own_row(i: int) -> None:
        nonlocal rows
        rows = order[i : i + 1]

    assert_same_alone(name, x, y, model, before_alone=own_row)


@pytest.mark.parametrize("name", STARTS)
def test_late_starts_are_the_same_alone(name):
    """Starts found after many tries (some in groups of START_GROUP per call) do not depend on the batch."""
    torch.manual_seed(0)
    x, model = torch.rand(6, 1, 8, 8) * 0.5, Bright()
    y = torch.zeros(6, dtype=torch.long)
    assert_same_alone(name, x, y, model)


@pytest.mark.parametrize("name", STARTS)
def test_images_without_a_start_ask_their_tries_in_groups(name):
    """A model that labels every image alike: each image spends its start tries, the first START_SINGLE
    one per call, the rest START_GROUP per call, then is done (the attack returns x)."""
    torch.manual_seed(0)
    x, model = torch.rand(3, 1, 8, 8) * 0.5, Bright(level=2.0)
    y = torch.zeros(3, dtype=torch.long)
    oracle, x_adv = run(name, x, y, model, start_tries=45)
    assert oracle.queries.tolist() == [45] * 3
    assert len(oracle.calls) == START_SINGLE + math.ceil((45 - START_SINGLE) / START_GROUP)
    assert torch.equal(x_adv, x)
