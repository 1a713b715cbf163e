"""MFDV-SNN (seed 004): the trained per-feature sigma, the MFDV preset (vector std read from the model),
and the Monte-Carlo prediction rule ``mc`` of a defense."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import Counting, images, tiny_cnn

from sinai.attacks.oracle import Oracle, QueryRules
from sinai.attacks.threat import ThreatModel
from sinai.defenses import Defense, NoiseSpec, parse_defense, protect
from sinai.defenses.sites import LEARNED_STD, classifier_head, resolve_learned
from sinai.models.embedded import CnnArch
from sinai.models.mfdv import MfdvTraining, learned_log_sigma

STEPS = 120


@pytest.fixture(scope="module")
def mnist_subset() -> SimpleNamespace:
    """1000 train and 300 test images of the embedded MNIST."""
    from sinai.models.data import mnist

    train, test = mnist("train"), mnist("test")
    x_train, y_train = train.load(torch.arange(1000)), train.labels[:1000]
    x_test, y_test = test.load(torch.arange(300)), test.labels[:300]
    return SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def train_small(method: MfdvTraining, data: SimpleNamespace, *, steps: int = STEPS, seed: int = 0):
    """A small CNN trained ``steps`` AdamW steps with ``method``'s loss (the main loop of a recipe);
    returns the model in eval mode, its initial ln sigma and the last logged scalars."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CnnArch(channels=(8,), hidden=32)()
        method.attach(model)
        start = learned_log_sigma(model).detach().clone()
        method.prepare(model, data)
        opt = torch.optim.AdamW(method.param_groups(model, lr=3e-3, weight_decay=5e-4))
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(data.y_train), (64,), generator=gen)
            loss, logged = method.loss(model, data.x_train[idx], data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval(), start, logged


@pytest.fixture(scope="module")
def trained(mnist_subset) -> dict:
    """The small CNN trained with lambda1 = 0 (the paper's ablation) and with a large lambda1."""
    return {lam: train_small(MfdvTraining(lambda1=lam), mnist_subset) for lam in (0.0, 0.05)}


def with_sigma(model, sigma: torch.Tensor):
    """``model`` with MFDV's ln sigma attached and set to ``ln sigma``."""
    MfdvTraining().attach(model)
    with torch.no_grad():
        learned_log_sigma(model).copy_(sigma.log())
    return model


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------------------------------ training
def test_sigma_is_trained_and_lambda1_raises_it(trained):
    model0, start0, logged0 = trained[0.0]
    model1, start1, logged1 = trained[0.05]
    assert torch.equal(start0, start1)  # same seed, same initial sigma
    s0, s1 = learned_log_sigma(model0).detach(), learned_log_sigma(model1).detach()
    assert (s0 - start0).abs().max() > 0.05  # sigma moved from its initialisation
    assert (s1 - start1).abs().max() > 0.05
    assert s1.exp().mean() > s0.exp().mean()  # the -lambda1 sum ln sigma term pushes sigma up
    for logged in (logged0, logged1):
        assert {"ce", "sigma", "sigma_over_std"} <= set(logged)
        assert all(math.isfinite(v) for v in logged.values())


def test_training_noise_only_inside_loss(mnist_subset):
    torch.manual_seed(0)
    model = CnnArch(channels=(8,), hidden=32)()
    method = MfdvTraining(lambda1=0.01)
    method.attach(model)
    _, head = classifier_head(model)
    x, y = mnist_subset.x_train[:32], mnist_subset.y_train[:32]
    for mode in (True, False):  # the plain model is deterministic in train and in eval mode
        model.train(mode)
        with torch.no_grad():
            assert torch.equal(model(x), model(x))
    model.train()
    first, _ = method.loss(model, x, y)
    second, _ = method.loss(model, x, y)
    assert first.item() != second.item()  # the training forward draws noise
    assert not head._forward_pre_hooks  # and leaves no hook behind
    assert LEARNED_STD in dict(head.named_parameters())
    assert any(k.endswith(LEARNED_STD) for k in model.state_dict())


def test_finish_reports_sigma_and_accuracies(trained, mnist_subset):
    model, _, _ = trained[0.05]
    metrics = MfdvTraining(lambda1=0.05).finish(model, mnist_subset)
    sigma = learned_log_sigma(model).detach().exp()
    assert metrics["sigma_mean"] == pytest.approx(sigma.mean().item(), rel=1e-4)
    assert metrics["sigma_min"] <= metrics["sigma_mean"] <= metrics["sigma_max"]
    assert metrics["sigma_over_std"] > 0 and metrics["h_std_mean"] > 0 and metrics["logit_noise_over_std"] > 0
    for key in ("clean_accuracy_sigma0", "noisy_accuracy", "noisy_accuracy_mc15"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["clean_accuracy_sigma0"] > 0.5  # it learned something in 120 steps
    json.dumps(metrics)


def test_method_options_and_key():
    default = MfdvTraining(lambda1=0.01)
    other = MfdvTraining(**MfdvTraining.parse_options("lambda1=0.1"))
    assert other.lambda1 == 0.1
    assert other.options(default) == "lambda1=0.1" and default.options(default) == ""
    assert other.key() != default.key() and json.dumps(other.key())
    assert "0.1" in other.describe()
    assert MfdvTraining(lambda1=0).lambda1 == 0.0  # the paper's ablation is allowed
    for bad in (-0.1, float("nan"), float("inf"), True, "x"):
        with pytest.raises(ValueError) as err:
            MfdvTraining(lambda1=bad)
        assert "lambda1" in one_line(err)
    for text in ("lambda2=1", "lambda1=x", "lambda1", "", "lambda1=1,lambda1=2"):
        with pytest.raises(ValueError) as err:
            MfdvTraining.parse_options(text)
        one_line(err)
    with pytest.raises(ValueError) as err:
        MfdvTraining(init="normal")
    assert "uniform" in one_line(err)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError) as err:
            MfdvTraining(sigma_lr=bad)
        assert "sigma_lr" in one_line(err)
    assert MfdvTraining(sigma_lr=3).options(MfdvTraining()) == "sigma_lr=3"


def test_param_groups_leave_sigma_out_of_weight_decay():
    model = tiny_cnn()
    method = MfdvTraining(sigma_lr=5)
    method.attach(model)
    weights, sigma = method.param_groups(model, lr=0.01, weight_decay=0.05)
    assert sigma["params"] == [learned_log_sigma(model)]
    assert sigma["lr"] == pytest.approx(0.05) and sigma["weight_decay"] == 0.0
    assert weights["lr"] == 0.01 and weights["weight_decay"] == 0.05
    assert len(weights["params"]) + 1 == len(list(model.parameters()))
    before = learned_log_sigma(model).detach().clone()
    method.attach(model)  # attaching again keeps the trained sigma
    assert torch.equal(learned_log_sigma(model), before)


# ------------------------------------------------------------------------------------ MFDV preset
def test_mfdv_noise_has_the_learned_std_per_feature():
    sigma = torch.linspace(0.05, 1.0, 16)
    model = with_sigma(tiny_cnn(), sigma)
    x = images(400, seed=1)
    defended = protect(model, "MFDV", seed=0)
    learned = learned_log_sigma(model).detach().exp()
    assert defended.defense.specs["feature"].std == tuple(learned.tolist())  # read exactly from the model
    _, head = classifier_head(model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        with defended.clean():
            defended(x)
        h = seen.pop()
        for _ in range(10):
            defended(x)
    handle.remove()
    noise = torch.cat([z - h for z in seen])  # 4000 draws per feature
    std = noise.std(dim=0)
    assert torch.allclose(std, sigma, rtol=0.08)
    assert noise.mean(dim=0).abs().max() < 0.1
    corr = torch.corrcoef(noise.T) - torch.eye(16)
    assert corr.abs().max() < 0.1  # independent features


def test_mfdv_clean_is_the_sigma0_network():
    model = with_sigma(tiny_cnn(), torch.full((16,), 0.5))
    x = images(8)
    defended = protect(model, "MFDV", seed=0)
    with torch.no_grad():
        plain = model(x)
        assert not torch.equal(defended(x), plain)
        with defended.clean():
            assert torch.equal(defended(x), plain)
    # the text "MFDV:std=0" is refused as a defense that adds nothing; the spec itself is the sigma-0 network
    sigma0 = Defense({"feature": NoiseSpec(std=0.0, learned=True)}, name="MFDV")
    for name in (sigma0, "none"):  # sigma scaled to 0: the plain network
        with torch.no_grad():
            assert torch.equal(protect(model, name, seed=0)(x), plain)


def test_mfdv_std_scales_the_learned_sigma():
    sigma = torch.linspace(0.1, 0.8, 16)
    model = with_sigma(tiny_cnn(), sigma)
    resolved = resolve_learned(parse_defense("MFDV:std=0.5"), model)
    assert resolved.specs["feature"].std == pytest.approx(tuple((0.5 * sigma).tolist()))
    assert parse_defense("MFDV").describe() == "MFDV(feature std=learned)"
    assert "vec[16]" in protect(model, "MFDV").defense.describe()


def test_mfdv_without_learned_sigma_is_one_line():
    with pytest.raises(ValueError) as err:
        protect(tiny_cnn(), "MFDV")
    assert "--mfdv" in one_line(err)


# ---------------------------------------------------------------------------------- Monte-Carlo rule
def test_mc_is_log_mean_softmax_of_the_passes():
    model = with_sigma(tiny_cnn(), torch.full((16,), 0.8))
    x = images(6)
    with torch.no_grad():
        deployed = protect(model, "MFDV:mc=15", seed=3)(x)
        single = protect(model, "MFDV", seed=3)
        probs = torch.stack([F.softmax(single(x), dim=-1) for _ in range(15)])
    assert torch.allclose(deployed, probs.mean(0).log(), atol=1e-5)
    assert torch.allclose(deployed.exp().sum(1), torch.ones(6), atol=1e-5)
    xg = x.clone().requires_grad_(True)  # differentiable: white-box attacks attack the deployed rule
    protect(model, "MFDV:mc=4", seed=0)(xg).logsumexp(1).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():
        defended = protect(model, "MFDV:mc=15", seed=0)
        with defended.clean():  # one exact undefended pass
            assert torch.equal(defended(x), model(x))


def test_mc_counts_one_query_per_image():
    counted = Counting(with_sigma(tiny_cnn(), torch.full((16,), 0.3)))
    defended = protect(counted, "MFDV:mc=5", seed=0)
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    oracle = Oracle(defended, x, y, threat=ThreatModel("linf", 0.1), rules=QueryRules(10, votes=0))
    oracle(x, torch.arange(4))
    assert oracle.queries.tolist() == [1, 1, 1, 1]  # the server runs the passes
    assert counted.seen == 5 * 4


def test_mc_parse_and_roundtrip():
    rnd = parse_defense("RND:std=0.05,mc=15")
    assert rnd.mc == 15 and rnd.specs["input"].std == 0.05
    assert parse_defense("MFDV:mc=15").mc == 15
    assert parse_defense("input.std=0.02,mc=3").mc == 3
    assert "mc" not in parse_defense("RND").to_dict()  # older stored results keep their form
    for d in (rnd, Defense({"feature": NoiseSpec(std=[0.1, 0.0, 2.5])}, name="vec", mc=2)):
        data = json.loads(json.dumps(d.to_dict()))
        assert Defense.from_dict(data) == d
    assert Defense.from_dict(parse_defense("MFDV:std=0.5").to_dict()).specs["feature"].learned


def test_vector_std_validation_and_describe():
    spec = NoiseSpec(std=torch.tensor([0.25, 0.5]))
    assert spec.std == (0.25, 0.5) and spec.active
    assert not NoiseSpec(std=[0.0, 0.0]).active
    assert NoiseSpec(std=0.1).std == 0.1 and isinstance(NoiseSpec(std=1).std, float)
    assert "vec[2] mean 0.375" in Defense({"feature": spec}).describe()
    for bad in ([0.1, -0.2], [float("nan")], [0.1, float("inf")], [], [[0.1]], ["a"]):
        with pytest.raises(ValueError) as err:
            NoiseSpec(std=bad)
        assert "std" in one_line(err)


def test_vector_std_of_the_wrong_length_is_one_line():
    defended = protect(tiny_cnn(), Defense({"feature": NoiseSpec(std=[0.1] * 5)}), seed=0)
    with pytest.raises(ValueError) as err:
        defended(images(2))
    assert "16" in one_line(err) and "5" in one_line(err)


@pytest.mark.parametrize(
    "text", ["RND:mc=0", "RND:mc=-1", "RND:mc=1.5", "AAA:mc=15", "none:mc=2", "RND:std=0,mc=3"]
)
def test_bad_mc_is_one_line(text):
    with pytest.raises(ValueError) as err:
        parse_defense(text)
    assert "mc" in one_line(err)


def test_bad_learned_specs():
    for kwargs in ({"std": [0.1], "learned": True}, {"std": 1.0, "learned": True, "layers": ("a",)}):
        with pytest.raises(ValueError) as err:
            NoiseSpec(**kwargs)
        one_line(err)
    with pytest.raises(ValueError) as err:
        Defense({"input": NoiseSpec(std=1.0, learned=True)})
    assert "feature" in one_line(err)
    with pytest.raises(ValueError) as err:
        Defense({"input": NoiseSpec(std=0.1)}, mc=0)
    one_line(err)
