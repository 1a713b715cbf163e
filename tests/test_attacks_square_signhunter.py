"""Square Attack and SignHunter: they break undefended models, count queries exactly, stay in the ball."""

import math

import pytest
import torch
from conftest import Counting
from torch import nn

from sinai.attacks.oracle import Oracle, QueryRules
from sinai.attacks.signhunter import SignHunter
from sinai.attacks.square import Square, meta_pattern, p_level
from sinai.attacks.threat import ThreatModel, project

EPS = {"linf": 0.3, "l2": 3.0}


class Linear(nn.Module):
    """Two classes, margin of class 0 = w . x + bias (never broken for a large bias); records its inputs."""

    def __init__(self, n: int, bias: float = 100.0, seed: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(seed)))
        self.bias, self.num_classes, self.inputs = bias, 2, []

    def forward(self, x):
        self.inputs.append(x.clone())
        z = x.flatten(1) @ self.w + self.bias
        return torch.stack([z, torch.zeros_like(z)], 1)


@pytest.fixture(scope="module")
def first50(mnist_images):
    x, y = mnist_images
    return x[:50], y[:50]


def check_run(attack, threat, model, x, y, budget):
    """Run ``attack`` through a counting oracle; check counts, budget and the threat model; return it."""
    counted = Counting(model)
    oracle = Oracle(counted, x, y, threat=threat, rules=QueryRules(budget=budget, votes=0))
    x_adv = attack(oracle)
    assert x_adv.shape == x.shape
    assert counted.seen == int(oracle.queries.sum())  # every forward is a counted query (votes=0)
    assert int(oracle.queries.max()) <= budget
    assert (oracle.queries[~oracle.success] == budget).all()  # unbroken images spent the whole budget
    assert (oracle.queries[oracle.success] == oracle.success_at[oracle.success]).all()  # then stopped
    pairs = [(x_adv, x)]
    if oracle.success.any():  # the oracle's own copies of the verified adversarial examples
        pairs.append((oracle.x_adv[oracle.success], x[oracle.success]))
    for xa, xs in pairs:
        assert (threat.distance(xa, xs) <= threat.eps + 1e-6).all()
        assert xa.min() >= 0 and xa.max() <= 1
    return oracle


ATTACKS = [
    pytest.param(Square, "linf", 0.8, id="square-linf"),
    pytest.param(Square, "l2", 0.8, id="square-l2"),
    pytest.param(SignHunter, "linf", 0.8, id="signhunter-linf"),
    pytest.param(SignHunter, "l2", 0.6, id="signhunter-l2"),  # its l2 steps are small: ~0.7 on the CNN
]


@pytest.mark.parametrize("model_name", ["mnist-cnn", "mnist-vit"])
@pytest.mark.parametrize(("cls", "norm", "rate"), ATTACKS)
def test_breaks_undefended_models_within_1000_queries(cls, norm, rate, model_name, mnist_models, first50):
    x, y = first50
    model = mnist_models[model_name].eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    oracle = check_run(cls(), ThreatModel(norm, EPS[norm]), model, x, y, budget=1000)
    assert oracle.success[correct].float().mean() >= rate
    assert oracle.success[~correct].all()  # misclassified images fall at their first query


@pytest.mark.parametrize(("cls", "norm"), [(Square, "linf"), (Square, "l2"), (SignHunter, "linf")])
def test_tiny_budget_stops_exactly(cls, norm, mnist_models, first50):
    x, y = first50
    oracle = check_run(cls(), ThreatModel(norm, 0.05), mnist_models["mnist-cnn"].eval(), x, y, budget=20)
    assert int(oracle.queries.max()) == 20


@pytest.mark.parametrize(("cls", "norm"), [(Square, "linf"), (Square, "l2"), (SignHunter, "linf")])
def test_same_seed_same_run(cls, norm, mnist_models, first50):
    x, y = first50[0][:10], first50[1][:10]
    model = mnist_models["mnist-cnn"].eval()
    runs = []
    for seed in (0, 0, 1):
        oracle = Oracle(
            model, x, y, threat=ThreatModel(norm, EPS[norm] / 3), rules=QueryRules(budget=60, votes=0)
        )
        runs.append((cls()(oracle, seed=seed), oracle))
    (xa, oa), (xb, ob), (xc, oc) = runs
    assert torch.equal(xa, xb) and torch.equal(oa.queries, ob.queries)
    assert torch.equal(oa.success_at, ob.success_at)
    if cls is Square:
        assert not torch.equal(xa, xc)
    else:  # SignHunter draws nothing: the seed does not matter
        assert torch.equal(xa, xc)


def test_square_candidates_follow_the_paper():
    """linf candidates are vertices of the ball; l2 candidates use the whole budget (no clipping here)."""
    x = 0.5 + 0.05 * torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(3, dtype=torch.long)
    for norm, eps in (("linf", 0.1), ("l2", 0.5)):
        model = Linear(x[0].numel())
        Square()(Oracle(model, x, y, threat=ThreatModel(norm, eps), rules=QueryRules(budget=60, votes=0)))
        cand = torch.cat(model.inputs)
        assert len(cand) == 3 * 60
        delta = cand - x.repeat(60, 1, 1, 1)
        if norm == "linf":
            assert torch.allclose(delta.abs(), torch.full_like(delta, eps), atol=1e-6)
            first = delta[:3]
            assert (first == first[:, :, :1]).all()  # vertical stripes: constant along each column
        else:
            assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((180,), eps), atol=1e-4)


def test_square_schedule_and_patterns():
    # The paper's p halves after 10, 50, 200, ... of 10000 iterations, rescaled to the run's budget.
    it = torch.tensor([0, 10, 11, 50, 51, 200, 201, 8000, 8001, 9999])
    assert p_level(it, 10000).tolist() == [0, 0, 1, 1, 2, 2, 3, 8, 9, 9]
    assert p_level(torch.tensor([1, 2, 6, 100]), 1000).tolist() == [0, 1, 2, 4]
    assert Square().side_lengths(28, 28, "linf") == [6, 4, 3, 2, 2, 1, 1, 1, 1, 1]
    assert Square().side_lengths(28, 28, "l2") == [9, 7, 5, 3, 3, 3, 3, 3, 3, 3]
    pattern = meta_pattern(7)
    assert math.isclose(float(pattern.norm()), 1.0, rel_tol=1e-5)
    assert (pattern[:3] > 0).all() and (pattern[3:] < 0).all()


def reference_signhunter(model, x, eps, norm, budget):
    """One image, plain Python: the paper's SignHunter loop with restarts."""
    n = x.numel()
    step = eps if norm == "linf" else eps / math.sqrt(n)
    origin, s, best, h, i, fresh, x_adv = x.clone(), torch.ones(n), None, 0, 0, True, x.clone()
    for _ in range(budget):
        if fresh:
            trial = torch.ones(n)
        else:
            length = math.ceil(n / 2**h)
            start, end = i * length, min(n, (i + 1) * length)
            trial = s.clone()
            trial[start:end] *= -1
        cand = project(origin + step * trial.view_as(x), x[None], norm, eps)
        with torch.no_grad():
            logits = model(cand)
        loss = float(logits[0, 0] - logits[0, 1])
        if fresh:
            s, best, x_adv, fresh = trial, loss, cand[0], False
            continue
        if loss <= best:
            s, best, x_adv = trial, loss, cand[0]
        i += 1
        if i == 2**h or end == n:
            h, i = h + 1, 0
            if h == math.ceil(math.log2(n)) + 1:
                origin, h, fresh = x_adv.clone(), 0, True
    return x_adv


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_signhunter_matches_a_per_image_reference(norm):
    """Chunks of ceil(n / 2**h) (n = 6 is not a power of two), one query each, restarts after h = 3."""
    x = 0.4 + 0.2 * torch.rand(3, 1, 2, 3, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(3, dtype=torch.long)
    model, eps, budget = Linear(6, bias=20.0), {"linf": 0.1, "l2": 0.2}[norm], 40
    oracle = Oracle(model, x, y, threat=ThreatModel(norm, eps), rules=QueryRules(budget=budget, votes=0))
    x_adv = SignHunter()(oracle)
    assert oracle.queries.tolist() == [budget] * 3
    for k in range(3):
        expected = reference_signhunter(model, x[k], eps, norm, budget)
        assert torch.allclose(x_adv[k], expected, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown norm"):
        ThreatModel("l1", 0.05)
    with pytest.raises(ValueError, match="unknown norm"):
        ThreatModel("l0", 0.05)
    with pytest.raises(ValueError, match="p_init"):
        Square(p_init=0.0)
    x, y = torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.long)
    oracle = Oracle(
        Linear(4), x, y, threat=ThreatModel("linf", 0.05), rules=QueryRules(budget=5), output="labels"
    )
    with pytest.raises(ValueError, match="score"):
        SignHunter()(oracle)


@pytest.mark.parametrize("channels", [1, 3])
def test_square_linf_step_always_changes_the_image(channels):
    # Pixels at 0 and 1 clip one of the two colours to "no change": the step must redraw (or flip) those.
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(64, channels, 8, 8)
    x[:, :, :4] = 1.0
    attack = Square()
    best = attack.init_linf(x, 0.1, gen)
    side = torch.full((64,), 3)
    for _ in range(20):
        cand = attack.step_linf(x, best, side, 0.1, gen)
        assert ((cand - best).abs() > 1e-7).flatten(1).any(1).all()
        assert (cand - x).abs().max() <= 0.1 + 1e-6 and cand.min() >= 0 and cand.max() <= 1
        best = cand
