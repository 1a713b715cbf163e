"""sinai.analysis: gradient probes vs autograd, selection rules, Theorem 1 on a linear model, the CLI."""

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sinai.analysis.common import RobustCheck
from sinai.analysis.gradnorm import SelectiveNoise, gradient_norms, rank_agreement, ratio_sweep
from sinai.analysis.probes import attacker_loss, capture_gradients, default_layers
from sinai.analysis.sensitivity import sensitivity_summary, sweep_sensitivity
from sinai.analysis.theory import flip_rates, gradient_ratios, predicted_flip
from sinai.attacks.threat import ThreatModel
from sinai.defenses import find_sites, protect
from sinai.models.classifier import ImageClassifier


def _direct_grads(model, x, kind, labels=None):
    """|dL/dz| at every ``kind`` site by plain autograd: retain_grad on the tensor entering the module."""
    seen = []

    def keep(module, args):
        args[0].retain_grad()
        seen.append(args[0])

    handles = [s.module.register_forward_pre_hook(keep) for s in find_sites(model, [kind])[kind]]
    try:
        logits = model(x.clone().requires_grad_(True))
        labels = logits.argmax(1) if labels is None else labels
        attacker_loss(logits, labels).sum().backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return [t.grad.detach() for t in seen]


@pytest.mark.parametrize("name,kind", [("mnist-cnn", "relu"), ("mnist-vit", "gelu")])
def test_gradient_norms_match_autograd(mnist_models, mnist_images, name, kind):
    model = mnist_models[name]
    x, y = mnist_images[0][:12], mnist_images[1][:12]
    direct = _direct_grads(model, x, kind, y)
    _, captures, _ = capture_gradients(model, x, y, find_sites(model, [kind])[kind])
    assert len(captures) == len(direct)
    for c, g in zip(captures, direct, strict=True):
        torch.testing.assert_close(c.grad, g, rtol=1e-4, atol=1e-7)
    stats, pooled = gradient_norms(model, x, y, kinds=[kind], batch_size=5)
    flat = np.concatenate([g.abs().flatten().numpy() for g in direct])
    overall = next(s for s in stats if s.site == "all")
    assert overall.logits == flat.size
    assert overall.median == pytest.approx(float(np.median(flat)), rel=1e-4, abs=1e-9)
    assert overall.p95 == pytest.approx(float(np.percentile(flat, 95)), rel=1e-4)
    np.testing.assert_allclose(np.sort(pooled[kind]), np.sort(flat), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("rule", ["critical-grad", "noncritical-grad"])
def test_gradient_rules_noise_exactly_the_ranked_share(mnist_models, mnist_images, rule):
    model = mnist_models["mnist-cnn"]
    x = mnist_images[0][:6]
    ratio = 0.3
    direct = _direct_grads(model, x, "relu")  # labels: the model's own prediction, as the wrapper uses
    wrapper = SelectiveNoise(model, "relu", std=0.5, ratio=ratio, rule=rule, seed=1)
    first = find_sites(model, ["relu"])["relu"][0]
    entering = []
    probe = first.module.register_forward_hook(lambda m, a, o: entering.append(a[0].detach()))
    try:
        with torch.no_grad():
            wrapper(x)
            model(x)
    finally:
        probe.remove()
        wrapper.remove()
    noisy_z, clean_z = entering[-2:]  # (the gradient pass ran first)
    masks = list(wrapper.last_masks.values())
    assert len(masks) == len(direct)
    for mask, g in zip(masks, direct, strict=True):
        g, mask = g.abs().flatten(1), mask.flatten(1)
        assert (mask.sum(1) == math.ceil(ratio * g.shape[1])).all()
        chosen = torch.where(mask, g, torch.nan)
        rest = torch.where(mask, torch.nan, g)
        if rule == "critical-grad":  # the chosen ones are the largest gradient norms
            assert (chosen.nan_to_num(math.inf).amin(1) >= rest.nan_to_num(-math.inf).amax(1)).all()
        else:
            assert (chosen.nan_to_num(-math.inf).amax(1) <= rest.nan_to_num(math.inf).amin(1)).all()
    # At the first site nothing upstream is noisy: exactly the masked logits changed.
    changed = (noisy_z != clean_z).flatten(1)
    assert torch.equal(changed, masks[0].flatten(1))


def test_value_rule_wrapper_is_the_production_defense(mnist_models, mnist_images):
    model = mnist_models["mnist-vit"]
    x = mnist_images[0][:8]
    wrapper = SelectiveNoise(model, "gelu", std=0.3, ratio=0.6, rule="noncritical-value", seed=4)
    try:
        with torch.no_grad():
            ours = wrapper(x)
    finally:
        wrapper.remove()
    with protect(model, "gelu.std=0.3,gelu.ratio=0.6", seed=4) as defended, torch.no_grad():
        torch.testing.assert_close(ours, defended(x), rtol=0, atol=0)


def test_ratio_sweep_and_agreement_shapes_and_errors(mnist_models, mnist_images):
    model = mnist_models["mnist-cnn"]
    x, y = mnist_images[0][:20], mnist_images[1][:20]
    rows = ratio_sweep(model, x, y, "relu", std=0.3, ratios=(0.0, 0.5, 1.0), passes=1)
    assert len(rows) == 12 and {r.rule for r in rows} == {
        "noncritical-value",
        "critical-value",
        "noncritical-grad",
        "critical-grad",
    }
    at0 = [r.clean for r in rows if r.ratio == 0.0]
    assert all(a == rows[0].base for a in at0)  # no logit gets noise at ratio 0
    agree = rank_agreement(model, x[:10], y[:10], kinds=["relu"])
    assert len(agree) == len(find_sites(model, ["relu"])["relu"])
    assert all(-1 <= r.spearman <= 1 and 0 <= r.precision <= 1 and r.ratio == 0.5 for r in agree)
    assert list(agree[0].as_dict()) == ["model", "kind", "site", "spearman", "precision_at_0.5"]
    with pytest.raises(ValueError, match="no 'gelu' sites"):
        SelectiveNoise(model, "gelu", std=0.1, ratio=0.5, rule="critical-grad")
    with pytest.raises(ValueError, match="ratio"):
        ratio_sweep(model, x, y, "relu", std=0.3, ratios=(1.5,))
    with pytest.raises(ValueError, match="std"):
        ratio_sweep(model, x, y, "relu", std=-0.1)


def test_sensitivity_sweep(mnist_models, mnist_images):
    model = mnist_models["mnist-vit"]
    x, y = mnist_images
    robust = RobustCheck(x[:4], y[:4], ThreatModel("linf", 0.1), budget=3)
    rows = sweep_sensitivity(model, x, y, kinds=["attn", "gelu"], stds=(0.0, 3.0), passes=1, robust=robust)
    assert [(r.kind, r.std) for r in rows] == [("attn", 0.0), ("attn", 3.0), ("gelu", 0.0), ("gelu", 3.0)]
    zero, big = rows[2], rows[3]
    assert zero.clean == zero.base and zero.mse_mid == 0.0
    assert big.clean < big.base and big.mse_mid > 0 and big.mse_logits > 0
    assert zero.robust == robust(model) and 0 <= zero.robust <= 1
    assert big.robust is None  # clean accuracy fell more than robust_max_drop: no attack spent
    (summary,) = [s for s in sensitivity_summary(rows) if s.kind == "gelu"]
    assert summary.as_dict()["std_at_1pct_drop"] == summary.std_at_drop[0][1]
    with pytest.raises(ValueError, match="no 'relu' sites"):
        sweep_sensitivity(model, x, y, kinds=["relu"])
    with pytest.raises(ValueError, match="unknown site kind"):
        sweep_sensitivity(model, x, y, kinds=["softmax"])
    with pytest.raises(ValueError, match="std must be"):
        sweep_sensitivity(model, x, y, stds=(-1.0,))


def _linear_model(seed: int = 0) -> ImageClassifier:
    """f(x) = W2 W1 x + b: two classes, so the margin loss is exactly linear in x and in the features."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return ImageClassifier(net, input_shape=(1, 4, 4), num_classes=2, mean=(0.0,), std=(1.0,), name="linear")


def test_theory_flip_probability_matches_on_a_linear_model():
    model = _linear_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 4, 4, generator=gen)
    y = torch.randint(0, 2, (4,), generator=gen)
    for layer, std in (("net.1", 0.05), ("input", 0.01)):
        rows = flip_rates(model, x, y, layer, std=std, probe_std=0.02, directions=3000, seed=3)
        predicted = np.array([r.predicted for r in rows])
        measured = np.array([r.measured for r in rows])
        assert np.abs(predicted - measured).max() < 0.035, (layer, predicted, measured)
        assert 0.02 < predicted.mean() < 0.5  # a non-trivial regime
    assert float(predicted_flip(0.0)) == 0.0 and float(predicted_flip(1e12)) == pytest.approx(0.5, abs=1e-5)
    ratios = gradient_ratios(model, x, y, ["input", "net.1"], step=0.05)
    assert all(r.ratio_clean == pytest.approx(1.0) for r in ratios if r.layer == "input")


def test_default_layers(mnist_models):
    cnn_layers = default_layers(mnist_models["mnist-cnn"])
    assert cnn_layers[-1] == "net.mlp.3" and "penultimate" not in cnn_layers  # mlp.3 feeds the head
    assert default_layers(mnist_models["mnist-vit"]) == [f"net.blocks.{i}" for i in range(4)] + [
        "penultimate"
    ]


@pytest.fixture
def short_models(monkeypatch, mnist_models):
    """``load_model`` answers with the session's short-trained models (no training in the CLI test)."""
    import sinai.models.zoo

    monkeypatch.setattr(sinai.models.zoo, "load_model", lambda name, **kw: mnist_models[name])


def _run(*args):
    from sinai.cli import cli

    return CliRunner().invoke(cli, ["analyze", *args, "--device", "cpu"], catch_exceptions=False)


@pytest.mark.parametrize(
    ("command", "args", "shown", "files", "inside"),
    [
        (
            "sensitivity",
            ["--model", "mnist-vit", "--stds", "0,0.5"],
            ["std_at_1pct_drop"],
            ["sensitivity.csv", "sensitivity_summary.csv", "sensitivity_clean.png", "sensitivity_mse.png"]
            + ["sensitivity_robust.png"],
            ("sensitivity.csv", "gelu"),
        ),
        (
            "gradnorm",
            ["--ratios", "0,0.5,1", "--std", "0.3", "--stat-images", "5"],
            ["median |dL/dz|"],
            [f"gradnorm_{f}.{ext}" for f in ("hist", "ratio", "agreement") for ext in ("csv", "png")]
            + ["gradnorm_stats.csv"],
            ("gradnorm_ratio.csv", "critical-grad"),
        ),
        (
            "theory",
            ["--model", "mnist-cnn", "--flip-images", "4", "--directions", "4"],
            ["P predicted", "net.mlp.3"],
            [f"theory_{f}.{ext}" for f in ("ratios", "flips", "layers") for ext in ("csv", "png")],
            ("theory_layers.csv", "net.mlp.3"),
        ),
    ],
)
def test_cli_analyze_commands_write_csv_and_png(short_models, tmp_path, command, args, shown, files, inside):
    tiny = ["--images", "20", "--robust-images", "10", "--budget", "5", "--passes", "1"]
    result = _run(command, *tiny, *args, "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert all(text in result.output for text in shown)
    for f in files:
        assert (tmp_path / f).stat().st_size > 0
    name, text = inside
    assert text in (tmp_path / name).read_text()


def test_cli_analyze_rejects_bad_input(short_models, tmp_path):
    from sinai.cli import cli

    bad = CliRunner().invoke(cli, ["analyze", "sensitivity", "--model", "mnist-cnn", "--kinds", "attn"])
    assert bad.exit_code != 0 and "no 'attn' sites" in bad.output
    bad = CliRunner().invoke(cli, ["analyze", "gradnorm", "--ratios", "0,2"])
    assert bad.exit_code != 0 and "ratio must be in [0, 1]" in bad.output
