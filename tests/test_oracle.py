"""The Oracle: exact query counts, budgets, EOT and verified success on randomized models."""

import pytest
import torch
from torch import nn

from sinai.attacks.oracle import Oracle, QueryRules, group_rank
from sinai.attacks.threat import ThreatModel


class Counting(nn.Module):
    """Class = 1 if the mean pixel > 0.5 else 0; counts every image it sees. ``flip``: wrong 1 in 10."""

    def __init__(self, flip: float = 0.0, seed: int = 0):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.num_classes, self.input_shape, self.seen, self.flip = 2, (1, 2, 2), 0, flip
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, x):
        self.seen += len(x)
        cls = (x.flatten(1).mean(1) > 0.5).long()
        if self.flip:
            flips = torch.rand(len(x), generator=self.gen) < self.flip
            cls = torch.where(flips, 1 - cls, cls)
        return nn.functional.one_hot(cls, 2).float() + self.w


def imgs(values):
    return torch.tensor(values, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()


#: linf eps 1: the whole pixel cube, so every candidate is inside the threat model.
WHOLE_CUBE = ThreatModel("linf", 1.0)


def make_oracle(model, labels, **kwargs):
    """An oracle for ``len(labels)`` grey 2 x 2 images whose threat model admits every candidate."""
    rules = QueryRules(
        **{k: kwargs.pop(k) for k in ("budget", "eot", "votes", "lucky", "vote_rule") if k in kwargs}
    )
    threat = kwargs.pop("threat", WHOLE_CUBE)
    return Oracle(model, imgs([0.5] * len(labels)), labels, threat=threat, rules=rules, **kwargs)


def test_group_rank_counts_earlier_candidates_of_the_same_image():
    assert group_rank(torch.tensor([3, 1, 3, 3, 0, 1])).tolist() == [0, 0, 1, 2, 0, 1]


def test_queries_are_counted_exactly_and_verification_separately():
    model = Counting()
    oracle = make_oracle(model, torch.zeros(3, dtype=torch.long), budget=10, votes=9, vote_rule="fixed")
    out = oracle(imgs([0.1, 0.2, 0.9, 0.1]), torch.tensor([0, 1, 2, 0]))
    assert out.shape == (4, 2)
    assert oracle.queries.tolist() == [2, 1, 1]
    assert oracle.success.tolist() == [False, False, True] and oracle.success_at.tolist() == [0, 0, 1]
    assert oracle.vote_passes.tolist() == [0, 0, 9]
    assert model.seen == 4 + 9  # what the model saw = counted queries + votes
    # the sequential vote (default) draws blocks of 9 until 32 of at most 45 passes say wrong: 4 blocks
    model = Counting()
    oracle = make_oracle(model, torch.zeros(3, dtype=torch.long), budget=10, votes=9)
    oracle(imgs([0.1, 0.2, 0.9, 0.1]), torch.tensor([0, 1, 2, 0]))
    assert oracle.success.tolist() == [False, False, True] and oracle.vote_passes.tolist() == [0, 0, 36]
    assert model.seen == 4 + 36


def test_budget_masks_candidates_and_is_never_exceeded():
    model = Counting()
    oracle = make_oracle(model, torch.zeros(2, dtype=torch.long), budget=3)
    out = oracle(imgs([0.1] * 5), torch.tensor([0, 0, 0, 0, 1]))
    assert oracle.queries.tolist() == [3, 1]
    assert torch.isnan(out[3]).all() and not torch.isnan(out[:3]).any()
    assert oracle.done.tolist() == [True, False]
    oracle(imgs([0.1]), torch.tensor([0]))
    assert oracle.queries.tolist() == [3, 1] and model.seen == 4


def test_finished_images_are_not_queried():
    model = Counting()
    oracle = make_oracle(model, torch.zeros(1, dtype=torch.long), budget=10, votes=0)
    oracle(imgs([0.9]), torch.tensor([0]))
    seen = model.seen
    out = oracle(imgs([0.9, 0.1]), torch.tensor([0, 0]))
    assert model.seen == seen and torch.isnan(out).all() and oracle.queries.tolist() == [1]


def test_eot_counts_m_queries_and_returns_the_mean():
    model = Counting()
    oracle = make_oracle(model, torch.zeros(2, dtype=torch.long), budget=20, eot=5)
    oracle(imgs([0.1, 0.2]), torch.tensor([0, 1]))
    assert oracle.queries.tolist() == [5, 5] and model.seen == 10
    assert make_oracle(model, torch.zeros(1, dtype=torch.long), budget=7, eot=5).done.tolist() == [False]
    with pytest.raises(ValueError, match="eot"):
        make_oracle(model, torch.zeros(1, dtype=torch.long), budget=7, eot=0)


def test_a_single_noisy_flip_is_not_a_verified_success():
    model = Counting(flip=0.1)
    oracle = make_oracle(model, torch.zeros(200, dtype=torch.long), budget=50)
    x = imgs([0.1] * 200)
    for _ in range(20):
        oracle(x, torch.arange(200))
    assert oracle.vote_passes.sum() > 0  # flips happened and were checked
    assert oracle.success.float().mean() < 0.02  # but (almost) never confirmed by the majority of 9
    lucky = make_oracle(Counting(flip=0.1), torch.zeros(200, dtype=torch.long), budget=50, lucky=True)
    for _ in range(20):
        lucky(x, torch.arange(200))
    assert lucky.success.float().mean() > 0.5 and lucky.vote_passes.sum() == 0


def test_decision_mode_returns_labels_and_minus_one_for_refused():
    oracle = make_oracle(Counting(), torch.zeros(1, dtype=torch.long), budget=1, output="labels")
    assert oracle(imgs([0.1, 0.2]), torch.tensor([0, 0])).tolist() == [0, -1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, "budget"),
        ({"output": "probs"}, "output"),
        ({"labels": torch.tensor([2])}, "labels must be"),
    ],
)
def test_bad_oracle_arguments(kwargs, message):
    args = {"labels": torch.zeros(1, dtype=torch.long), "budget": 5} | kwargs
    with pytest.raises(ValueError, match=message):
        make_oracle(Counting(), args.pop("labels"), **args)


def test_live_lists_the_images_still_answered():
    oracle = make_oracle(Counting(), torch.zeros(3, dtype=torch.long), budget=2, votes=0)
    assert oracle.live().tolist() == [0, 1, 2]
    oracle(imgs([0.9, 0.1, 0.1]), torch.tensor([0, 1, 1]))  # image 0 broken, image 1 out of budget
    assert oracle.live().tolist() == [2]


def test_the_live_set_is_handed_out_again_until_an_image_finishes():
    oracle = make_oracle(Counting(), torch.zeros(3, dtype=torch.long), budget=3, votes=0)
    first = oracle.live()
    assert oracle.live() is first  # the same tensor: a query with it takes the oracle's fast path
    oracle(imgs([0.1, 0.1, 0.1]), first)
    assert oracle.live() is first and oracle.queries.tolist() == [1, 1, 1]
    out = oracle(imgs([0.1, 0.9, 0.1]), first)  # image 1 broken
    assert not torch.isnan(out).any() and oracle.success.tolist() == [False, True, False]
    live = oracle.live()
    assert live is not first and live.tolist() == [0, 2]
    out = oracle(imgs([0.1, 0.1, 0.1]), first)  # the stale set: image 1 is not answered any more
    assert torch.isnan(out[1]).all() and oracle.queries.tolist() == [3, 2, 3]
    assert oracle.live().tolist() == [] and oracle.done.all()


def test_the_cached_live_set_follows_changes_made_outside_the_oracle():
    oracle = make_oracle(Counting(), torch.zeros(2, dtype=torch.long), budget=5, votes=0)
    live = oracle.live()
    oracle.queries[0] = 5  # image 0's budget spent elsewhere
    assert oracle.live().tolist() == [1] and oracle.done.tolist() == [True, False]
    out = oracle(imgs([0.1, 0.1]), live)
    assert torch.isnan(out[0]).all() and oracle.queries.tolist() == [5, 1]
    oracle.live()[0] = 0  # a caller that edits what it was handed does not change the oracle
    oracle.done[1] = True
    assert oracle.live().tolist() == [1] and oracle.done.tolist() == [True, False]
    among = torch.tensor([True, True])
    assert oracle.live(among=among).tolist() == [1] and oracle.live(among=among) is oracle.live(among=among)
    among[1] = False
    assert oracle.live(among=among).tolist() == []


def test_several_candidates_per_live_image_count_in_order_up_to_the_budget():
    oracle = make_oracle(Counting(), torch.zeros(2, dtype=torch.long), budget=4, votes=0)
    oracle.live()
    oracle(imgs([0.1] * 4), torch.tensor([0, 0, 1, 1]))  # every image can take both
    out = oracle(imgs([0.1, 0.1, 0.1, 0.1, 0.1, 0.9]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert oracle.queries.tolist() == [4, 4] and torch.isnan(out[[2, 5]]).all()
    assert not oracle.success.any()  # image 1's wrong candidate was its fifth: never asked
    oracle = make_oracle(Counting(), torch.zeros(2, dtype=torch.long), budget=4, votes=0)
    oracle.live()
    oracle(imgs([0.1, 0.1, 0.9, 0.1]), torch.tensor([1, 1, 1, 0]))  # broken at its third query
    assert oracle.success.tolist() == [False, True] and oracle.success_at.tolist() == [0, 3]


def test_the_oracle_owns_the_threat_model():
    model, y = Counting(), torch.zeros(2, dtype=torch.long)
    x = imgs([0.5, 0.5])
    oracle = Oracle(model, x, y, threat=ThreatModel("l2", 0.5), rules=QueryRules(budget=5, votes=0))
    assert oracle.threat == ThreatModel("l2", 0.5) and torch.equal(oracle.x, x)
    oracle(imgs([0.9, 0.8]), torch.tensor([0, 1]))  # l2 distances 0.8 and 0.6: outside, no success
    assert not oracle.success.any()
    oracle(imgs([0.74, 0.45]), torch.tensor([0, 1]))  # 0.48: inside and wrong; 0.1: inside but right
    assert oracle.success.tolist() == [True, False]
    with pytest.raises(ValueError, match="larger than the diameter"):
        Oracle(model, x, y, threat=ThreatModel("l2", 2.5), rules=QueryRules(budget=5))
    with pytest.raises(ValueError, match="x must be"):
        Oracle(model, x[:1], y, threat=WHOLE_CUBE, rules=QueryRules(budget=5))
    with pytest.raises(TypeError, match="ThreatModel"):
        Oracle(model, x, y, threat=("linf", 0.1), rules=QueryRules(budget=5))
    with pytest.raises(TypeError, match="threat"):
        Oracle(model, x, y, rules=QueryRules(budget=5))


def test_threat_model_norms_projection_and_checks():
    x = torch.full((2, 1, 2, 2), 0.5)
    far = x + torch.tensor([0.3, -0.05]).view(2, 1, 1, 1)
    linf, l2 = ThreatModel("linf", 0.1), ThreatModel("l2", 0.2)
    assert linf.distance(far, x).tolist() == pytest.approx([0.3, 0.05])
    assert l2.distance(far, x).tolist() == pytest.approx([0.6, 0.1])
    assert linf.contains(far, x).tolist() == [False, True] and l2.contains(far, x).tolist() == [False, True]
    assert linf.distance(linf.project(far, x), x).tolist() == pytest.approx([0.1, 0.05])
    assert l2.distance(l2.project(far, x), x).tolist() == pytest.approx([0.2, 0.1])
    assert linf.contains(x + 0.1, x).all()  # on the sphere: inside (float slack)
    assert ThreatModel("linf", 1).eps == 1.0 and isinstance(ThreatModel("linf", 1).eps, float)
    assert linf.to_dict() == {"norm": "linf", "eps": 0.1}
    for norm, eps, message in (
        ("l1", 0.1, "unknown norm"),
        ("linf", 0.0, "eps must be a positive number"),
        ("l2", float("inf"), "eps must be a positive number"),
        ("linf", 1.5, "larger than the pixel range"),
    ):
        with pytest.raises(ValueError, match=message):
            ThreatModel(norm, eps)
