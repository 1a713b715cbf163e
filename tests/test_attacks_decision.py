"""Decision-based attacks: they break undefended models, count every query (binary searches included),
stay label-only, follow the threat model, and give an image the same run alone or in a batch."""

import pytest
import torch
from conftest import Counting
from torch import nn

from sinai.attacks import ATTACKS, attack_class, is_attack, list_attacks, make_attack
from sinai.attacks.oracle import Oracle, QueryRules
from sinai.attacks.threat import ThreatModel
from sinai.defenses import Defense, parse_defense, protect
from sinai.evaluation.config import EvalConfig
from sinai.evaluation.protocol import evaluate
from sinai.evaluation.store import ResultStore

DECISION = ("rays", "signflip", "hsja", "boundary", "signopt", "geoda")
EPS = {"linf": 0.3, "l2": 4.0}
#: The random-walk and boundary-geometry attacks need more queries (and room) on MNIST.
SLOW_BUDGET = {"boundary": 1000, "signopt": 1000, "geoda": 1000}


class Linear3(nn.Module):
    """Three classes with row-wise float64 logits (exactly batch-independent): z_k = <w_k, x> + b_k."""

    def __init__(self, shape=(1, 8, 8), seed: int = 0, bias: tuple = (0.0, 0.0, 0.0)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = torch.Size(shape).numel()
        self.w = nn.Parameter(torch.randn(3, n, generator=g, dtype=torch.float64) / n**0.5)
        self.b = torch.tensor(bias, dtype=torch.float64)
        self.num_classes, self.input_shape = 3, shape

    def forward(self, x):
        z = (x.flatten(1).double()[:, None, :] * self.w[None]).sum(2) + self.b
        return z.float()


def norm_of(name: str) -> str:
    return "linf" if "linf" in attack_class(name).norms else "l2"


def oracle_for(model, x, y, name, budget, **kwargs):
    norm = kwargs.pop("norm", norm_of(name))
    eps = kwargs.pop("eps", EPS[norm])
    rules = QueryRules(budget=budget, **{k: kwargs.pop(k) for k in ("eot", "votes", "lucky") if k in kwargs})
    oracle = Oracle(model, x, y, threat=ThreatModel(norm, eps), rules=rules, output="labels", **kwargs)
    return oracle, norm, eps


def test_registry_names_and_outputs():
    assert ATTACKS == list_attacks() == (
        "square", "signhunter", "nes", "bandits", "simba", "simba-dct",
        "rays", "signflip", "hsja", "boundary", "signopt", "geoda", "square-aaa",
        "fgsm", "pgd", "mifgsm", "cw", "autoattack", "eotpgd", "npixel", "transfer",
    )  # fmt: skip
    assert is_attack("RayS") and not is_attack("none") and attack_class("HSJA").name == "hsja"
    for name in ATTACKS:
        assert attack_class(name).name == name and make_attack(name).kwargs() == {}
        assert attack_class(name).kind in ("score", "decision", "white-box", "transfer")
    for name in DECISION:
        assert name in ATTACKS and attack_class(name).output == "labels"
    assert attack_class("rays").norms == ("linf",) and attack_class("signflip").norms == ("linf",)
    assert set(attack_class("hsja").norms) == {"l2", "linf"}
    for name in ("boundary", "signopt", "geoda"):
        assert attack_class(name).norms == ("l2",)


@pytest.fixture(scope="module")
def first8(mnist_images):
    """The first image of each of 8 classes (the sample is ordered by class)."""
    x, y = mnist_images
    firsts = [int(torch.nonzero(y == c)[0]) for c in range(8)]
    return x[firsts], y[firsts]


@pytest.mark.parametrize("model_name", ["mnist-cnn", "mnist-vit"])
@pytest.mark.parametrize("name", DECISION)
def test_breaks_undefended_models_and_counts_every_query(name, model_name, mnist_models, first8):
    x, y = first8
    model = mnist_models[model_name].eval()
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right], y[right]
    counted = Counting(model)
    budget = SLOW_BUDGET.get(name, 400)
    norm = norm_of(name)
    eps = 5.0 if name in SLOW_BUDGET else EPS[norm]
    oracle, norm, eps = oracle_for(
        counted, x, y, name, budget, norm=norm, eps=eps, votes=0, checkpoints=(budget,)
    )
    x_adv = make_attack(name)(oracle, seed=0)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    assert counted.seen == int(oracle.queries.sum())  # binary searches and checks are counted queries
    assert int(oracle.queries.max()) <= budget
    # an image stops at its success (calls with several candidates per image may count a few more)
    assert (oracle.success_at[oracle.success] <= oracle.queries[oracle.success]).all()
    assert oracle.success.float().mean() >= 0.75, f"{name} broke {oracle.success.tolist()}"
    broken = oracle.success
    assert (oracle.threat.distance(oracle.x_adv[broken], x[broken]) <= eps * (1 + 1e-6) + 1e-6).all()
    with torch.no_grad():
        assert (model(oracle.x_adv[broken]).argmax(1) != y[broken]).all()
    # the recorded checkpoint norm is reached no later than the verified success
    assert (oracle.checkpoint_norms[broken, 0] <= eps * (1 + 1e-6) + 1e-6).all()


@pytest.mark.parametrize("name", DECISION)
def test_one_image_alone_runs_exactly_as_in_the_batch(name):
    torch.manual_seed(0)
    model = Linear3(seed=1)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    norm = norm_of(name)
    eps = {"linf": 0.05, "l2": 0.3}[norm]  # small: the attacks run their full course
    runs = []
    for xs, ys in ((x, y), (x[3:4], y[3:4])):
        oracle, _, _ = oracle_for(model, xs, ys, name, 300, norm=norm, eps=eps, votes=0)
        x_adv = make_attack(name)(oracle, seed=7)
        row = 3 if len(xs) == 5 else 0
        runs.append(
            (x_adv[row], int(oracle.queries[row]), int(oracle.success_at[row]), oracle.checkpoint_norms[row])
        )
    (a, qa, sa, ca), (b, qb, sb, cb) = runs
    assert torch.equal(a, b) and (qa, sa) == (qb, sb) and torch.equal(ca, cb)
    assert not torch.equal(a, x[3])  # the attack did move the image


def test_rays_asks_every_live_image_in_every_oracle_call():
    class Recording(Oracle):
        def __call__(self, x, idx):
            self.calls.append((len(idx), int((~self.done).sum())))
            return super().__call__(x, idx)

    model = Linear3(seed=1)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    oracle = Recording(
        model, x, y, threat=ThreatModel("linf", 0.05), rules=QueryRules(budget=200, votes=0), output="labels"
    )
    oracle.calls = []
    make_attack("rays")(oracle)
    # fast checks and binary-search steps of different images share one call: the batch stays full
    assert len(oracle.calls) == 200 and all(asked == live for asked, live in oracle.calls)


class Brightness(nn.Module):
    """Class 1 for dark images (mean < 0.1), else class 0: every noise start of a bright image is
    labelled like the image itself, so its start fails."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # (the oracle takes its device from a parameter)
        self.num_classes, self.input_shape = 2, (1, 8, 8)

    def forward(self, x):
        dark = (x.flatten(1).mean(1) < 0.1).float() * self.scale
        return torch.stack([1 - dark, dark], 1)


def test_images_whose_start_failed_leave_the_rest_on_the_oracles_fast_path():
    class Recording(Oracle):
        def __call__(self, x, idx):
            self.calls.append((len(idx), self._handed_out(idx) is not None))
            return super().__call__(x, idx)

    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.rand(3, 1, 8, 8, generator=g) * 0.06, 0.5 + 0.5 * torch.rand(3, 1, 8, 8, generator=g)]
    )
    model = Brightness()
    with torch.no_grad():
        y = model(x).argmax(1)
    assert y.tolist() == [1, 1, 1, 0, 0, 0]
    # eps too small for a dark image to reach mean 0.1: the dark images run their full course
    oracle = Recording(
        model, x, y, threat=ThreatModel("linf", 0.02), rules=QueryRules(budget=300, votes=0), output="labels"
    )
    oracle.calls = []
    make_attack("signflip")(oracle, seed=0)
    assert not oracle.success.any() and (oracle.queries[:3] == 300).all()
    assert (oracle.queries[3:] == 100).all()  # the bright images gave up after their 100 start tries
    # The dark images ask one query in every call. After the bright ones' starts (10 calls of one try,
    # 9 of ten), each call is the oracle's own live set among them: the bright ones are still live to it.
    late = oracle.calls[19:]
    assert len(late) == 300 - 19 and all(rows == 3 and handed for rows, handed in late)


@pytest.mark.parametrize("name", ["rays", "hsja"])
def test_eot_majority_counts_m_queries_per_logical_query(name):
    model = Counting(Linear3(seed=2))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        y = model.model(x).argmax(1)
    oracle, _, _ = oracle_for(
        model, x, y, name, 90, eps=1e-3 if norm_of(name) == "linf" else 1e-2, eot=3, votes=0
    )
    make_attack(name)(oracle)
    assert (oracle.queries % 3 == 0).all() and model.seen == int(oracle.queries.sum())
    assert (oracle.queries[~oracle.success] == 90).all()


def test_labels_under_eot_are_the_majority_of_the_m_samples():
    class Flaky(nn.Module):
        """Class 1 on 2 of every 3 forwards of a row, class 0 otherwise (mean logits would say 0)."""

        def __init__(self):
            super().__init__()
            self.w, self.num_classes, self.calls = nn.Parameter(torch.zeros(1)), 2, 0

        def forward(self, x):
            self.calls += 1
            out = torch.zeros(len(x), 2)
            rows = torch.arange(len(x)) // (len(x) // 3)  # the M copies arrive stacked: copy 0, 1, 2
            out[:, 0] = torch.where(rows == 0, 10.0, 0.0)
            out[:, 1] = torch.where(rows == 0, 0.0, 1.0)
            return out

    x, y, whole_cube = torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), ThreatModel("linf", 1.0)
    oracle = Oracle(
        Flaky(), x, y, threat=whole_cube, rules=QueryRules(budget=9, eot=3, votes=0), output="labels"
    )
    assert oracle(torch.zeros(2, 1, 2, 2), torch.arange(2)).tolist() == [1, 1]
    assert oracle.queries.tolist() == [3, 3]


def test_success_counts_only_inside_the_eps_ball_and_checkpoints_record_norms():
    model = Linear3(seed=3, bias=(0.0, 100.0, 0.0))  # class 1 everywhere
    x = torch.full((1, 1, 8, 8), 0.5)
    y = torch.zeros(1, dtype=torch.long)
    threat = ThreatModel("linf", 0.1)
    oracle = Oracle(
        model,
        x,
        y,
        threat=threat,
        rules=QueryRules(budget=10, votes=0),
        output="labels",
        checkpoints=(1, 2, 5),
    )
    oracle(x + 0.3, torch.tensor([0]))  # wrong label, outside the ball: no success
    assert not oracle.success.any()
    oracle(x + 0.2, torch.tensor([0]))
    assert oracle.checkpoint_norms[0].tolist() == pytest.approx([0.3, 0.2, 0.2], abs=1e-6)
    oracle(x + 0.1, torch.tensor([0]))  # on the sphere: inside (float slack)
    assert oracle.success.tolist() == [True] and oracle.success_at.tolist() == [3]
    assert oracle.checkpoint_norms[0, 2].item() == pytest.approx(0.1, abs=1e-6)


def test_p_mis_is_zero_on_a_deterministic_model_and_positive_under_noise(mnist_models, first8):
    x, y = first8
    model = mnist_models["mnist-cnn"].eval()
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right][:4], y[right][:4]
    for defended, positive in ((model, False), (protect(model, "RND:std=0.3", seed=0), True)):
        oracle, _, _ = oracle_for(defended, x, y, "hsja", 60, track_mismatch=True, votes=0, eps=0.1)
        make_attack("hsja")(oracle)
        assert int(oracle.queries.sum()) > 0
        assert (int(oracle.mismatches.sum()) > 0) == positive
        if hasattr(defended, "remove"):
            defended.remove()


@pytest.mark.parametrize(
    ("name", "norm", "eps", "message"),
    [
        ("rays", "l2", 1.0, "rays is defined for linf only"),
        ("boundary", "linf", 0.1, "boundary is defined for l2 only"),
        ("geoda", "linf", 0.1, "defined for l2 only"),
        ("signflip", "l2", 1.0, "defined for linf only"),
    ],
)
def test_wrong_norm_is_a_clear_error(name, norm, eps, message):
    x, y = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    oracle = Oracle(
        Linear3(), x, y, threat=ThreatModel(norm, eps), rules=QueryRules(budget=5), output="labels"
    )
    with pytest.raises(ValueError, match=message):
        make_attack(name)(oracle)
    assert int(oracle.queries.sum()) == 0


def test_wrong_oracle_mode_or_missing_threat_model_is_a_clear_error():
    model = Linear3()
    x = torch.rand(2, 1, 8, 8)
    y = torch.zeros(2, dtype=torch.long)
    threat = ThreatModel("linf", 0.1)
    scores = Oracle(model, x, y, threat=threat, rules=QueryRules(budget=5))
    with pytest.raises(ValueError, match="decision-based attack"):
        make_attack("rays")(scores)
    labels = Oracle(model, x, y, threat=threat, rules=QueryRules(budget=5), output="labels")
    with pytest.raises(ValueError, match="score-based attack"):
        make_attack("square")(labels)
    with pytest.raises(TypeError, match="threat"):  # no oracle without the threat model
        Oracle(model, x, y, rules=QueryRules(budget=5), output="labels")
    with pytest.raises(ValueError, match="rays has no parameter 'eps'"):  # one threat model: the oracle's
        make_attack("rays", eps=0.2)
    with pytest.raises(ValueError, match="eot"):
        Oracle(model, x, y, threat=threat, rules=QueryRules(budget=5, eot=0), output="labels")
    with pytest.raises(ValueError, match="x must be"):
        Oracle(model, x[:1], y, threat=threat, rules=QueryRules(budget=5))


def test_evaluate_runs_a_decision_attack_and_stores_the_snd_metrics(mnist_models, first8, tmp_path):
    x, y = first8
    model = mnist_models["mnist-cnn"]
    args = dict(attack="rays", threat=ThreatModel("linf", 0.3), budgets=(20, 100), shard_size=4)
    store = ResultStore(tmp_path / "r.sqlite")
    config = EvalConfig(defense=parse_defense("RND:std=0.05"), track_mismatch=True, **args)
    result = evaluate(model, x, y, config, store=store, progress=False)
    assert all(len(r.checkpoint_norms) == 2 for r in result.results)
    assert result.attack_success_rate(100) > 0.5 and result.robust_accuracy(100) < 0.5
    assert result.mean_norm(100) is not None and result.mean_norm(100) <= result.mean_norm(20)
    assert result.p_mis is not None and 0 <= result.p_mis <= 1
    again = store.results(store.runs()[0][0])  # read back from SQLite
    assert again == list(result.results)
    plain = evaluate(model, x, y, EvalConfig(defense=Defense(name="none"), **args), progress=False)
    assert plain.p_mis is None and all(r.mismatches is None for r in plain.results)
    with pytest.raises(ValueError, match="eot"):
        EvalConfig(eot=0, **args)


@pytest.mark.slow
def test_hsja_peer_comparison_reports_every_tool(mnist_models, mnist_images):
    from sinai.bench.attacks import compare_hsja

    x, y = mnist_images
    rows = compare_hsja(mnist_models["mnist-cnn"], x[:10], y[:10], iterations=2)
    assert rows[0].tool == "sinai HopSkipJump" and len(rows) == 3
    assert all(r.images == 10 and r.seconds > 0 for r in rows)
    assert rows[0].success_rate >= min(r.success_rate for r in rows[1:])
