"""The noise mechanism: sites, specs, presets and protect()."""

import math

import pytest
import timm
import torch
import torchvision
from conftest import images, tiny_cnn, tiny_vit
from torch import nn

from sinai.defenses import (
    Defense,
    NoiseSpec,
    find_sites,
    parse_defense,
    preset,
    protect,
    selected_count,
)
from sinai.models.classifier import ImageClassifier

ALL_PRESETS_VIT = ["RND", "FND", "SINAI", "SINAI-Attn", "SINAI-FFN"]


@pytest.mark.parametrize("name", ALL_PRESETS_VIT)
@torch.no_grad()
def test_noise_changes_outputs_per_image_and_per_call(name):
    model = tiny_vit()
    x = images(1).repeat(3, 1, 1, 1)  # the same image three times in one batch
    defended = protect(model, preset(name), seed=0)
    a, b, clean = defended(x), defended(x), model(x)
    assert not torch.allclose(a, clean)
    assert not torch.allclose(a, b)  # fresh noise on every forward
    assert not torch.allclose(a[0], a[1]) and not torch.allclose(a[1], a[2])  # fresh noise per image


@torch.no_grad()
def test_seed_reproduces_and_os_entropy_does_not():
    model, x = tiny_vit(), images()
    same = [protect(model, "SINAI", seed=7)(x) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    other = protect(model, "SINAI", seed=8)(x)
    assert not torch.allclose(same[0], other)
    entropy = [protect(model, "SINAI", seed=None)(x) for _ in range(2)]
    assert not torch.allclose(entropy[0], entropy[1])
    defended = protect(model, "SINAI", seed=3)
    first = defended(x)
    defended.reseed(3)
    assert torch.equal(defended(x), first)


@torch.no_grad()
def test_clean_context_and_raw_model_are_exactly_undefended():
    model, x = tiny_vit(), images()
    reference = model(x)
    defended = protect(model, "SINAI", seed=0)
    with defended.clean():
        assert torch.equal(defended(x), reference)
    assert torch.equal(model(x), reference)  # hooks act only inside the defended forward
    assert not torch.allclose(defended(x), reference)
    defended.remove()
    assert torch.equal(defended(x), reference)


@torch.no_grad()
def test_noise_does_not_depend_on_training_mode():
    model, x = tiny_vit(), images()  # no dropout or BatchNorm: train and eval compute the same
    defended = protect(model, "SINAI", seed=1)
    defended.train()
    in_train = defended(x)
    defended.eval()
    defended.reseed(1)
    assert torch.equal(defended(x), in_train)


class Recorder:
    """Pre-hook that stores what a module receives (registered after protect, so it sees the noise)."""

    def __init__(self, module):
        self.inputs = []
        module.register_forward_pre_hook(lambda m, a: self.inputs.append(a[0].detach().clone()))


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.55, 1.0])
@torch.no_grad()
def test_ratio_selects_exactly_the_smallest_logits_per_sample(ratio):
    layer = nn.Sequential(nn.Linear(7, 40), nn.ReLU())
    model = ImageClassifier(
        nn.Sequential(nn.Flatten(), layer), input_shape=(1, 1, 7), num_classes=40, mean=(0.0,), std=(1.0,)
    )
    x = images(5, (1, 1, 7))
    z = layer[0](x.flatten(1))
    defended = protect(model, Defense({"relu": NoiseSpec(std=1.0, ratio=ratio)}), seed=0)
    seen = Recorder(layer[1])
    defended(x)
    noised = seen.inputs[0] != z
    k = selected_count(ratio, 40)
    assert k == math.ceil(ratio * 40)
    for i in range(5):
        smallest = set(torch.topk(z[i], k, largest=False).indices.tolist()) if k else set()
        assert set(torch.nonzero(noised[i]).flatten().tolist()) == smallest


def test_selected_count_has_no_float_round_up():
    assert selected_count(0.3, 10) == 3 and selected_count(0.31, 10) == 4 and selected_count(0.7, 10) == 7


@torch.no_grad()
def test_threshold_selection_noises_the_ratio_on_average():
    model, x = tiny_cnn(), images(64)
    spec = NoiseSpec(std=0.5, ratio=0.4, selection="threshold")
    defended = protect(model, Defense({"relu": spec}), seed=0)
    with pytest.raises(ValueError, match="calibrate_thresholds"):
        defended(x)
    defended.calibrate_thresholds(images(256, seed=1))
    relu = model.net[2]
    clean_in = []
    hook = relu.register_forward_pre_hook(lambda m, a: clean_in.append(a[0].clone()))
    model(x)
    hook.remove()
    seen = Recorder(relu)
    defended(x)
    share = (seen.inputs[0] != clean_in[0]).float().mean().item()
    assert abs(share - 0.4) < 0.05


@pytest.mark.parametrize("fused", [True, False])
@torch.no_grad()
def test_attention_noise_enters_before_softmax(fused):
    model = tiny_vit(qkv_bias=True)
    x = images()
    attn = model.net.blocks[0].attn
    attn.fused_attn = fused
    # Make every token's value vector identical: a convex combination of equal rows ignores the weights,
    # so pre-softmax noise (rows still sum to 1) leaves the block output unchanged.
    dim = attn.qkv.in_features
    attn.qkv.weight[2 * dim :].zero_()
    attn.qkv.bias[2 * dim :].normal_()
    outputs = {}
    attn.register_forward_hook(lambda m, a, out: outputs.setdefault("out", []).append(out))
    defended = protect(model, "SINAI-Attn:std=3.0", seed=0)
    with defended.clean():
        defended(x)
    defended(x)
    clean_out, noisy_out = outputs["out"]
    assert torch.allclose(clean_out, noisy_out, atol=1e-5)
    # ...while the same noise does change a block whose values differ between tokens.
    block1 = []
    model.net.blocks[1].attn.register_forward_hook(lambda m, a, out: block1.append(out))
    with defended.clean():
        defended(x)
    defended(x)
    assert not torch.allclose(block1[0], block1[1], atol=1e-3)


@torch.no_grad()
def test_fused_and_manual_attention_paths_agree():
    model, x = tiny_vit(), images()
    defended = protect(model, "SINAI-Attn:std=2.0", seed=5)
    fused = defended(x)
    for block in model.net.blocks:
        block.attn.fused_attn = False
    defended.reseed(5)
    manual = defended(x)
    assert torch.allclose(fused, manual, atol=1e-5)
    assert not torch.allclose(fused, model(x), atol=1e-3)


@torch.no_grad()
def test_relu_noise_before_every_call_of_torchvision_shared_relu():
    net = torchvision.models.resnet18(num_classes=10).eval()
    model = ImageClassifier(net, input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    block = net.layer1[0]  # BasicBlock: one nn.ReLU called twice (after bn1, after the residual add)
    before = []
    block.relu.register_forward_pre_hook(lambda m, a: before.append(a[0].clone()))
    defended = protect(model, Defense({"relu": NoiseSpec(std=0.1)}), seed=0)
    after = Recorder(block.relu)
    defended(images(2, (3, 32, 32)))
    assert len(before) == len(after.inputs) == 2
    for b, a in zip(before, after.inputs, strict=True):
        assert not torch.equal(a, b)
        assert 0.05 < (a - b).std().item() < 0.2


@torch.no_grad()
def test_input_noise_has_the_requested_std_in_pixel_units():
    model, x = tiny_cnn(), images(32)
    seen = Recorder(model.net)  # the inner net sees (x + noise - mean) / std
    protect(model, "RND:std=0.05", seed=0)(x)
    noise = seen.inputs[0] * 0.5 + 0.5 - x
    assert abs(noise.std().item() - 0.05) < 0.005 and abs(noise.mean().item()) < 0.005


@torch.no_grad()
def test_feature_noise_defaults_to_penultimate_and_accepts_named_layers():
    model, x = tiny_cnn(), images()
    assert [s.name for s in find_sites(model, ["feature"])["feature"]] == ["net.6"]
    defended = protect(model, "FND:std=0.3", seed=0)
    head_in = Recorder(model.net[6])
    model(x)
    defended(x)
    clean, noisy = head_in.inputs
    assert 0.25 < (noisy - clean).std().item() < 0.35
    named = protect(model, "FND:std=0.3,layers=net.0", seed=0)
    assert [s.name for s in named.sites] == ["net.0"]
    assert not torch.allclose(named(x), model(x))


TIMM_AND_TV = [
    ("timm", "vit_tiny_patch16_224", (3, 224, 224), ["RND", "FND", "SINAI", "SINAI-Attn", "SINAI-FFN"]),
    ("timm", "deit_tiny_patch16_224", (3, 224, 224), ["SINAI", "SINAI-Attn"]),
    ("timm", "resnet18", (3, 64, 64), ["RND", "FND", "SINAI"]),
    ("torchvision", "resnet18", (3, 64, 64), ["RND", "FND", "SINAI"]),
]


@pytest.mark.parametrize(("lib", "name", "shape", "presets"), TIMM_AND_TV)
@torch.no_grad()
def test_presets_work_on_timm_and_torchvision_models(lib, name, shape, presets):
    torch.manual_seed(0)
    if lib == "timm":
        net = timm.create_model(name, pretrained=False, num_classes=10)
    else:
        net = getattr(torchvision.models, name)(num_classes=10)
    model = ImageClassifier(net, input_shape=shape, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3).eval()
    x = images(2, shape)
    clean = model(x)
    for p in presets:
        defended = protect(model, p, seed=0)
        assert defended.sites, p
        out = defended(x)
        assert out.shape == (2, 10) and not torch.allclose(out, clean), p
        defended.remove()
    assert torch.equal(model(x), clean)


def test_sinai_uses_only_the_kinds_the_model_has():
    assert {s.kind for s in protect(tiny_cnn(), "SINAI", seed=0).sites} == {"relu"}
    assert {s.kind for s in protect(tiny_vit(), "SINAI", seed=0).sites} == {"attn", "gelu"}


def test_zero_std_kinds_are_not_hooked():
    defended = protect(tiny_vit(), "SINAI:attn.std=0,gelu.std=0.1", seed=0)
    assert {s.kind for s in defended.sites} == {"gelu"}


def test_parse_defense_forms():
    assert parse_defense("RND:std=0.03").specs["input"].std == 0.03
    sinai = parse_defense("sinai:attn.std=1.0,gelu.std=0.1,gelu.ratio=0.7")
    assert sinai.name == "SINAI" and sinai.specs["gelu"] == NoiseSpec(std=0.1, ratio=0.7)
    free = parse_defense("input.std=0.01,attn.std=0.5")
    assert set(free.specs) == {"input", "attn"} and free.require == "all"
    assert parse_defense("FND:std=0.1,layers=a.b|c").specs["feature"].layers == ("a.b", "c")
    assert parse_defense("none").specs == {}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: NoiseSpec(std=-0.1), "std must be"),
        (lambda: NoiseSpec(std=float("nan")), "std must be"),
        (lambda: NoiseSpec(std=0.1, ratio=1.5), "ratio must be in"),
        (lambda: NoiseSpec(std=0.1, ratio=-0.1), "ratio must be in"),
        (lambda: NoiseSpec(std=0.1, selection="fast"), "selection must be"),
        (lambda: Defense({"logits": NoiseSpec(std=0.1)}), "unknown site kind 'logits'"),
        (lambda: Defense({"attn": NoiseSpec(std=0.1, ratio=0.5)}), "ratio applies only"),
        (lambda: parse_defense("XYZ"), "unknown defense 'XYZ'"),
        (lambda: parse_defense("SINAI:std=0.1"), "say which site kind"),
        (lambda: parse_defense("RND:sigma=0.1"), "unknown defense field 'sigma'"),
        (lambda: parse_defense("RND:std=abc"), "std must be a number"),
        (lambda: preset("RND", attn=0.1), "cannot set"),
        (lambda: protect(tiny_cnn(), "SINAI-Attn"), r"needs \['attn'\] sites"),
        (lambda: protect(tiny_cnn(), "FND:std=0.1,layers=nope"), "no layer named 'nope'"),
    ],
)
def test_bad_input_gets_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.rand(2, 1, 16, 16) * 255, r"must lie in \[0, 1\]"),
        (torch.rand(2, 3, 16, 16), "expected"),
        (torch.rand(1, 16, 16), "expected"),
        (torch.randint(0, 255, (2, 1, 16, 16)), "floating point"),
    ],
)
def test_bad_images_get_a_clear_error(x, message):
    with pytest.raises(ValueError, match=message):
        protect(tiny_cnn(), "RND", seed=0)(x)


@pytest.mark.gpu
@torch.no_grad()
def test_noise_is_drawn_on_the_cuda_device():
    model = tiny_vit().cuda()
    defended = protect(model, "SINAI", seed=0)
    x = images().cuda()
    a, b = defended(x), defended(x)
    assert a.is_cuda and not torch.allclose(a, b)
    devices = defended._generators.devices()
    assert devices == [torch.device("cuda", 0)] or all(d.type == "cuda" for d in devices)


def test_for_model_names_only_the_kinds_a_model_has():
    assert set(preset("SINAI").for_model(tiny_cnn()).specs) == {"relu"}
    assert set(preset("SINAI").for_model(tiny_vit()).specs) == {"attn", "gelu"}
    with pytest.raises(ValueError, match=r"needs \['attn'\] sites"):
        preset("SINAI-Attn").for_model(tiny_cnn())


def test_defended_model_keeps_the_applicable_defense_and_finds_sites_once(monkeypatch):
    from sinai.defenses import sites as sites_module

    calls = []
    real = sites_module.find_sites
    monkeypatch.setattr(sites_module, "find_sites", lambda *a, **k: calls.append(1) or real(*a, **k))
    defended = protect(tiny_cnn(), "SINAI", seed=0)
    assert len(calls) == 1
    assert defended.defense == preset("SINAI").restricted_to({"relu"})
    assert {s.kind for s in defended.sites} == {"relu"}


@pytest.mark.parametrize(
    "text", ["RND", "SINAI:attn.std=1.0,gelu.std=0.1,gelu.ratio=0.7", "FND:std=0.1,layers=a.b|c", "none"]
)
def test_defense_dict_round_trips_through_json(text):
    import json

    defense = parse_defense(text)
    data = json.loads(json.dumps(defense.to_dict()))
    assert Defense.from_dict(data) == defense
    # the stored form of a fixed-std spec (``learned`` is written only when True: older runs keep their form)
    stored = {k: {f: v for f, v in vars(s).items() if f != "learned"} for k, s in defense.specs.items()}
    assert data["specs"] == {k: {**v, "layers": list(v["layers"])} for k, v in stored.items()}
    assert Defense.from_dict(data) != parse_defense("RND:std=0.5")


def test_a_new_preset_is_one_decorated_definition(monkeypatch):
    from sinai.defenses import DEFAULT_SPECS, PRESETS, list_defenses, register_defense, spec

    assert list_defenses() == (
        "none", "RND", "SND", "FND", "SINAI", "SINAI-Attn", "SINAI-FFN", "AAA", "SINAI-selective", "MFDV"
    )  # fmt: skip
    monkeypatch.setattr(spec, "_BUILDERS", dict(spec._BUILDERS))
    before = dict(spec._PRESETS)
    try:

        @register_defense("Both")
        def both(input, relu):
            return Defense({"input": input, "relu": relu}, require="any")

        assert list_defenses()[-1] == "Both" and PRESETS["Both"] == (("input", "relu"), "any")
        made = parse_defense("both:relu.std=0.5")
        assert made.name == "Both" and made.require == "any" and made.specs["relu"].std == 0.5
        assert made.specs["input"] == DEFAULT_SPECS["input"]
        with pytest.raises(ValueError, match="already registered"):
            register_defense("rnd")(both)
        with pytest.raises(ValueError, match="unknown site kind"):
            register_defense("Bad")(lambda softmax: Defense({}))
    finally:
        spec._PRESETS.clear()
        spec._PRESETS.update(before)
