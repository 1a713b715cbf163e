"""SINAI-selective (seed 001): approximation branches, their training, the ``approx`` defense, BitOPs."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import images, tiny_cnn
from torch import nn

from sinai.analysis.bitops import bitops
from sinai.defenses import protect
from sinai.defenses.selective import exact_mask
from sinai.defenses.spec import Defense, SelectiveSpec, parse_defense, preset
from sinai.models.classifier import ImageClassifier
from sinai.models.embedded import EMBEDDED, TrainConfig
from sinai.models.selective import (
    SelectiveTraining,
    approx_convs,
    attach_branches,
    distil,
    layer_mse,
    mixed_forward,
)


def branched(net: nn.Module | None = None, *, k: int | float | None = 4, seed: int = 0) -> ImageClassifier:
    """``tiny_cnn`` (or ``net`` wrapped for 1x16x16 images) with approximation branches, in eval mode."""
    model = (
        tiny_cnn()
        if net is None
        else ImageClassifier(net, input_shape=(1, 16, 16), num_classes=10, mean=(0.5,), std=(0.5,))
    )
    attach_branches(model, k=k, seed=seed)
    for _, conv in approx_convs(model):
        conv.approx.init_from(conv)
    return model.eval()


def linear_after_conv() -> ImageClassifier:
    """Conv then linear layers only: the gradient through the conv output does not depend on its value."""
    torch.manual_seed(1)
    return branched(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16 * 16, 10)))


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------------------ branches and training
def test_plain_model_is_exact_and_branches_are_in_the_state_dict() -> None:
    plain = tiny_cnn()
    model = branched(copy.deepcopy(plain).net)
    x = images(4)
    assert torch.equal(model(x), plain(x))  # the conv's forward ignores its branch
    keys = [k for k in model.state_dict() if ".approx." in k]
    assert {k.rsplit(".", 1)[1] for k in keys} == {"weight", "bias", "projection"}
    reloaded = branched(copy.deepcopy(plain).net, seed=5)  # another P, then the saved one loads over it
    reloaded.load_state_dict(model.state_dict())
    assert torch.equal(reloaded.net[0].approx.projection, model.net[0].approx.projection)


def test_projection_is_sparse_ternary_and_seeded() -> None:
    conv = nn.Conv2d(16, 32, 3)
    a = attach_branches(nn.Sequential(copy.deepcopy(conv)), k=36, seed=3)[0][1].approx.projection
    b = attach_branches(nn.Sequential(copy.deepcopy(conv)), k=36, seed=3)[0][1].approx.projection
    c = attach_branches(nn.Sequential(copy.deepcopy(conv)), k=36, seed=4)[0][1].approx.projection
    assert torch.equal(a, b) and not torch.equal(a, c)
    scale = math.sqrt(3 / 36)
    assert set(torch.unique(a / scale).round().tolist()) == {-1.0, 0.0, 1.0}
    assert abs(float((a == 0).float().mean()) - 2 / 3) < 0.05  # P(0) = 2/3
    assert a.shape == (36, 16 * 9)


def test_default_k_is_a_quarter_of_d() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1))
    ks = [conv.approx.k for _, conv in attach_branches(model)]
    assert ks == [2, 9, 2]  # round(9/4), round(36/4), round(8/4)


def test_distillation_mse_falls() -> None:
    model = branched(k=3)
    x = images(64)
    before = layer_mse(model, x)
    history = distil(model, x, epochs=6, lr=1e-2, batch_size=16)
    after = layer_mse(model, x)
    (name,) = before
    assert history[-1][name] < history[0][name]
    assert after[name]["mse"] < before[name]["mse"]
    assert not model.training


def test_int4_weights_take_at_most_16_values_per_output_channel() -> None:
    model = branched(nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16 * 14 * 14, 10)), k=20)
    branch = model.net[0].approx
    with torch.no_grad():
        branch.weight.normal_()
        branch.bias.normal_()
    q = branch.quantized_weight()
    assert all(len(torch.unique(row)) <= 16 for row in q)
    assert len(torch.unique(branch.quantized_bias())) <= 16
    x = torch.randn(2, 3, 16, 16)
    before = branch(x)
    branch.freeze_quantized()  # what finish() stores: the grid itself, and quantising it again is exact
    assert all(len(torch.unique(row)) <= 16 for row in branch.weight)
    assert torch.allclose(branch(x), before, atol=1e-6)
    # the straight-through estimator: W~ gets the gradient of W~_Q
    branch.weight.grad = None
    branch(x).sum().backward()
    assert branch.weight.grad is not None and branch.weight.grad.abs().sum() > 0


def test_mixed_forward_gives_mse_and_gradients_to_every_weight() -> None:
    model = branched().train()
    x, y = images(8), torch.arange(8) % 10
    with mixed_forward(model, 0.9) as mses:
        loss = F.cross_entropy(model(x), y)
    (loss + 0.1 * torch.stack(mses).mean()).backward()
    conv = model.net[0]
    assert len(mses) == 1 and conv.weight.grad.abs().sum() > 0 and conv.approx.weight.grad.abs().sum() > 0
    assert not conv._forward_hooks  # hooks removed on exit


# ------------------------------------------------------------------------------ selection (Eq. 2)
@pytest.mark.parametrize("ratio", [0.5, 0.8, 0.9, 0.99])
def test_top_k_keeps_exactly_the_top_share_exact(ratio: float) -> None:
    z = torch.randn(5, 8, 6, 6)
    mask = exact_mask(z, ratio)
    n = 8 * 6 * 6
    keep = math.ceil((1 - ratio) * n - 1e-9)
    assert mask.reshape(5, -1).sum(1).tolist() == [keep] * 5
    flat, fmask = z.reshape(5, -1), mask.reshape(5, -1)
    for row, m in zip(flat, fmask, strict=True):
        assert row[m].min() >= row[~m].max()  # the exact ones are the largest by signed z~


@pytest.mark.parametrize(("n", "m"), [(1, 8), (2, 8), (7, 8), (2, 4)])
def test_n_m_approximates_exactly_n_per_group(n: int, m: int) -> None:
    z = torch.randn(3, 16, 5, 5)
    mask = exact_mask(z, n / m, n=n, m=m)
    groups = mask.reshape(3, 16 // m, m, 5, 5)
    assert ((~groups).sum(2) == n).all()  # N approximated in each group of M consecutive channels
    zg = z.reshape(3, 16 // m, m, 5, 5)
    kept_min = zg.masked_fill(~groups, math.inf).amin(2)
    dropped_max = zg.masked_fill(groups, -math.inf).amax(2)
    assert (kept_min >= dropped_max).all()


def test_defended_model_is_eq_2_before_batchnorm_deterministic_and_clean_is_exact() -> None:
    model = branched()
    x = images(6)
    with protect(model, "SINAI-selective:ratio=0.8") as defended:
        out = defended(x)
        assert torch.equal(out, defended(x))  # deterministic: P is fixed, nothing is drawn
        assert torch.allclose(defended(x[:2]), out[:2], atol=1e-5)  # a sample does not depend on its batch
        with defended.clean():
            assert torch.equal(defended(x), model(x))
        assert not defended.defense.randomized
    conv, rest = model.net[0], model.net[1:]
    xn = (x - model.mean) / model.std
    z, approx = conv(xn), conv.approx(xn)
    manual = rest(torch.where(exact_mask(approx, 0.8), z, approx))
    assert torch.allclose(out, manual, atol=1e-5)
    assert not torch.allclose(out, model(x), atol=1e-4)


def test_bpda_gradient_is_the_exact_networks_and_the_naive_one_differs() -> None:
    model = linear_after_conv()
    x = images(3)
    weights = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))

    def grad(net: nn.Module) -> torch.Tensor:  # a loss linear in the logits: its gradient is the network's
        xg = x.clone().requires_grad_(True)
        (net(xg) * weights).sum().backward()
        return xg.grad

    exact = grad(model)
    with protect(model, "SINAI-selective") as defended:
        naive = grad(defended)
        with defended.straight_through():
            bpda = grad(defended)
            with torch.no_grad():
                assert torch.equal(defended(x), defended.model(x)) is False  # the forward is still z'
    assert torch.allclose(bpda, exact, atol=1e-6)
    assert not torch.allclose(naive, exact, atol=1e-3)


# ------------------------------------------------------------------------------ BitOPs
def test_bitops_of_a_small_net_equals_a_hand_count() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(32, 3))
    model = ImageClassifier(net, input_shape=(1, 4, 4), num_classes=3, mean=(0.0,), std=(1.0,))
    dense = bitops(model, weight_bits=8, act_bits=8)
    conv_macs, linear_macs = 4 * 4 * 2 * 9, 32 * 3
    assert [row["macs"] for row in dense.rows()] == [conv_macs, linear_macs]
    assert dense.total == (conv_macs + linear_macs) * 8 * 8 == dense.dense_total
    assert dense.reduction_percent == 0

    attach_branches(model, k=3, seed=0)
    nonzeros = int((net[0].approx.projection != 0).sum())
    approx = 16 * (nonzeros * 8 + 2 * 3 * 4 * 8)  # per position: P.Q(x) additions + W~ MACs (INT4 x 8-bit)
    for spec in ("SINAI-selective:ratio=0.5", "SINAI-selective:n=1,m=2"):
        cost = bitops(model, weight_bits=8, act_bits=8, defense=spec)
        exact = 16 * 9 * 8 * 8  # 16 of the 32 outputs computed exactly
        assert cost.total == exact + approx + linear_macs * 64
        assert cost.dense_total == dense.total
        assert math.isclose(cost.reduction_percent, 100 * (1 - cost.total / dense.total))
    with protect(model, "SINAI-selective:ratio=0.75") as defended:  # a defended model brings its spec
        assert bitops(defended, weight_bits=8, act_bits=8).rows()[0]["exact_outputs"] == 8


# ------------------------------------------------------------------------------ specs and bad input
def test_parse_round_trip_and_describe() -> None:
    d = parse_defense("SINAI-selective:ratio=0.8")
    assert (
        d.specs["approx"] == SelectiveSpec(ratio=0.8) and d.describe() == "SINAI-selective(approx ratio=0.8)"
    )
    nm = parse_defense("SINAI-selective:n=2,m=8")
    assert (nm.specs["approx"].n, nm.specs["approx"].m, nm.specs["approx"].ratio) == (2, 8, 0.25)
    assert nm.describe() == "SINAI-selective(approx 2:8)"
    for defense in (parse_defense("SINAI-selective"), d, nm, preset("SINAI-selective", approx=0.7)):
        assert Defense.from_dict(defense.to_dict()) == defense
        assert defense.non_smooth == ("approx",) and not defense.randomized
    assert parse_defense("approx.ratio=0.6").specs["approx"].ratio == 0.6


def test_training_options_round_trip() -> None:
    default = SelectiveTraining()
    custom = SelectiveTraining(k=8, ratio=0.8, act_bits=4)
    text = custom.options(default)
    assert dataclasses.replace(default, **SelectiveTraining.parse_options(text)) == custom
    assert default.options(default) == ""
    assert SelectiveTraining.parse_options("k=0.5")["k"] == 0.5
    assert custom.key()["k"] == 8 and "k=8" in custom.describe()


@pytest.mark.parametrize(
    "make",
    [
        lambda: SelectiveSpec(ratio=0.0),
        lambda: SelectiveSpec(ratio=1.0),
        lambda: SelectiveSpec(ratio=1.5),
        lambda: SelectiveSpec(n=9, m=8),
        lambda: SelectiveSpec(n=2),
        lambda: SelectiveSpec(m=8),
        lambda: SelectiveSpec(ratio=0.5, n=2, m=8),
        lambda: parse_defense("SINAI-selective:ratio=1.2"),
        lambda: parse_defense("SINAI-selective:n=x"),
        lambda: parse_defense("SINAI-selective:k=3"),
        lambda: SelectiveTraining(k=0),
        lambda: SelectiveTraining(ratio=1.0),
        lambda: SelectiveTraining.parse_options("k=two"),
        lambda: SelectiveTraining.parse_options("lambda=1"),
        lambda: attach_branches(nn.Sequential(nn.Conv2d(1, 4, 3)), k=10),  # d = 9
        lambda: SelectiveTraining().attach(tiny_cnn_without_convs()),
        lambda: protect(tiny_cnn(), "SINAI-selective"),
        lambda: protect(branched(), "SINAI-selective:n=1,m=3"),  # 8 channels are not groups of 3
    ],
)
def test_bad_input_is_one_line_value_error(make) -> None:
    with pytest.raises(ValueError) as err:
        make()
    one_line(err)


def test_protect_without_branches_says_how_to_train() -> None:
    with pytest.raises(ValueError, match="sinai train mnist-cnn --selective"):
        protect(tiny_cnn(), "SINAI-selective")


def tiny_cnn_without_convs() -> ImageClassifier:
    net = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
    return ImageClassifier(net, input_shape=(1, 16, 16), num_classes=10, mean=(0.5,), std=(0.5,))


# ------------------------------------------------------------------------------ the method end to end
def test_selective_training_prepare_loss_finish(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from sinai.models.data import mnist, sample
    from sinai.models.embedded import build_embedded

    monkeypatch.setenv("SINAI_CACHE_DIR", str(tmp_path))
    short = TrainConfig(epochs=2, batch_size=64, lr=3e-3, weight_decay=5e-4, augment=0, train_images=1000)
    monkeypatch.setitem(EMBEDDED, "mnist-cnn", dataclasses.replace(EMBEDDED["mnist-cnn"], train=short))
    x_train, y_train = sample(mnist("train"), 300, seed=0)
    x_test, y_test = sample(mnist("test"), 100, seed=0)
    data = SimpleNamespace(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

    method = SelectiveTraining(base="mnist-cnn", distill_epochs=2, distill_lr=1e-2)
    model = build_embedded("mnist-cnn")
    method.attach(model)
    prep = method.prepare(model, data, device="cpu", progress=False)
    first, last = prep["distill_mse_first_epoch"], prep["distill_mse_last_epoch"]
    assert set(first) == {name for name, _ in approx_convs(model)}
    assert sum(last.values()) < sum(first.values())

    model.train()
    stats = model.net.features[1].running_mean.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(3):
        loss, logs = method.loss(model, x_train[i * 32 : (i + 1) * 32], y_train[i * 32 : (i + 1) * 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(logs) == {"ce", "mse"} and math.isfinite(loss.item())
    assert torch.equal(model.net.features[1].running_mean, stats)  # BatchNorm keeps the base's statistics
    assert model.net.features[1].training  # and its mode

    model.eval()
    metrics = method.finish(model, data)
    assert set(metrics["selective_test_accuracy"]) == {"0.5", "0.8", "0.9", "0.99"}
    assert 0 <= metrics["exact_test_accuracy"] <= 1 and prep["base_test_accuracy"] > 0.5
    for row in metrics["selective_test_accuracy"].values():
        assert 0 < row["bitops"] < metrics["dense_bitops"]
    for _, conv in approx_convs(model):  # stored on the INT4 grid
        assert all(len(torch.unique(r)) <= 16 for r in conv.approx.weight)
