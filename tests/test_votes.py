"""The sequential vote's error rate and the confirmation of returned examples, on a model whose
misclassification probability is known by construction (issue: success verification under repetition)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binom
from torch import nn

from sinai.attacks import Oracle, QueryRules, ThreatModel
from sinai.attacks.oracle import spent_alpha, vote_threshold
from sinai.evaluation import EvalConfig, evaluate

THREAT = ThreatModel("linf", 0.1)


class KnownRate(nn.Module):
    """Ignores the image: logits (0, -margin) plus N(0, std^2) noise on each, true class 0, so every
    query is misclassified with probability P(N(0, 2 std^2) > margin), the same for every input."""

    randomized = True

    def __init__(self, rate: float, std: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        from scipy.stats import norm

        self.margin = float(norm.isf(rate) * std * math.sqrt(2))
        self.std, self.num_classes, self.input_shape = std, 2, (1, 4, 4)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the Oracle a device
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = torch.tensor([0.0, -self.margin]).expand(len(x), 2)
        return base + self.std * torch.randn(len(x), 2, generator=self.gen)


def _false_acceptances(rule: str, images: int = 200, budget: int = 200) -> int:
    """Images 'broken' by an attack that re-submits the clean image (true rate 0.5) every query."""
    model = KnownRate(0.5)
    x, y = torch.rand(images, 1, 4, 4), torch.zeros(images, dtype=torch.long)
    oracle = Oracle(model, x, y, threat=THREAT, rules=QueryRules(budget=budget, votes=9, vote_rule=rule))
    idx = torch.arange(images)
    for _ in range(budget):
        live = oracle.live()
        if not len(live):
            break
        oracle(x[live], idx[live])
    return int(oracle.success.sum())


def test_sequential_vote_keeps_false_acceptance_below_alpha_over_a_whole_attack():
    images = 200
    accepted = _false_acceptances("sequential", images)
    # alpha = 1% over the whole attack: at most the 99.9% quantile of Binomial(200, 0.01) images
    assert accepted <= binom.ppf(0.999, images, 0.01)


def test_fixed_nine_vote_rule_accepts_borderline_candidates():
    accepted = _false_acceptances("fixed", 100, budget=50)
    assert accepted >= 90  # a 50% candidate wins a 9-vote majority half the time, and it gets many votes


def test_sequential_vote_accepts_clear_successes_and_ledgers_its_passes():
    model = KnownRate(0.95)
    x, y = torch.rand(50, 1, 4, 4), torch.zeros(50, dtype=torch.long)
    oracle = Oracle(model, x, y, threat=THREAT, rules=QueryRules(budget=5, votes=9))
    oracle(x, torch.arange(50))
    assert oracle.success.float().mean() >= 0.9
    assert (oracle.queries == 1).all()  # votes are not counted queries
    need = vote_threshold(45, spent_alpha(0.01, torch.tensor([1])).item())
    assert (oracle.vote_passes[oracle.success] >= need).all()  # accepted at the earliest after `need` passes


def test_vote_cap_stops_votes_and_is_recorded():
    model = KnownRate(0.5)
    x, y = torch.rand(10, 1, 4, 4), torch.zeros(10, dtype=torch.long)
    oracle = Oracle(model, x, y, threat=THREAT, rules=QueryRules(budget=100, votes=9, vote_cap=30))
    for _ in range(100):
        live = oracle.live()
        if not len(live):
            break
        oracle(x[live], live)
    assert (oracle.vote_passes <= 30).all() and oracle.capped.any()


def test_vote_thresholds_are_exact_binomial_tails():
    for level in (0.006, 1e-4, 1e-8):
        c = vote_threshold(45, level)
        assert binom.sf(c - 1, 45, 0.5) <= level < binom.sf(c - 2, 45, 0.5)
    assert float(spent_alpha(0.01, torch.arange(1, 100_000)).sum()) <= 0.01


@pytest.mark.parametrize("rate", [0.2, 0.35])
def test_confirmation_rate_matches_the_constructed_probability(rate):
    model = KnownRate(rate, seed=1)
    x, y = torch.rand(20, 1, 4, 4), torch.zeros(20, dtype=torch.long)
    config = EvalConfig(attack="square", threat=THREAT, budgets=(20,), lucky=True, confirm=401)
    result = evaluate(model, x, y, config, progress=False)
    rates = torch.tensor([r.confirm_rate for r in result.results if r.confirm_rate is not None])
    assert len(rates) >= 10 and all(
        r.confirm_passes == 401 for r in result.results if r.confirm_rate is not None
    )
    sigma = math.sqrt(rate * (1 - rate) / 401)
    assert (rates - rate).abs().max() < 4.5 * sigma
    # broken by the single lucky query, robust by confirmation: the examples are mostly classified right
    broken = [r for r in result.results if r.confirm_rate is not None]
    assert not any(r.robust_at(20) for r in broken) and all(r.robust_confirmed_at(20) for r in broken)


def test_bad_vote_settings_are_one_line():
    with pytest.raises(ValueError, match="vote_rule must be one of sequential, fixed"):
        EvalConfig(vote_rule="sprt")
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\)"):
        EvalConfig(vote_alpha=0)
    with pytest.raises(ValueError, match="confirm must be an integer >= 0"):
        EvalConfig(confirm=-1)
