"""Hugging Face ``transformers`` ViT / DeiT (eager and SDPA attention): SINAI's sites are found by
intercepting their attention softmax / ``F.scaled_dot_product_attention`` and ``F.gelu`` calls, and get the
same noise as timm's sites. Tiny randomly initialised configs (``from_config``): nothing is downloaded."""

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import images
from torch import nn
from torch.overrides import TorchFunctionMode

from sinai.defenses import describe_sites, find_sites, protect, selected_count
from sinai.defenses.intercept import input_shape
from sinai.models.classifier import ImageClassifier

transformers = pytest.importorskip("transformers", minversion="5.0")

LAYERS, HEADS, HIDDEN, MLP, SHAPE = 2, 2, 32, 64, (1, 28, 28)
ARCHS = {"vit": "ViT", "deit": "DeiT"}
IMPLS = ("eager", "sdpa")
ATTN_HOW = {"eager": "intercepted softmax", "sdpa": "intercepted F.scaled_dot_product_attention"}


@pytest.fixture(autouse=True, scope="module")
def offline():
    """Nothing here may reach the Hub (``from_config`` never does; this makes sure)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


class Logits(nn.Module):
    """A ``transformers`` image classifier on [0, 1] images (normalised to [-1, 1]) returning ``.logits``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values=x * 2 - 1).logits


def hf_model(arch: str, impl: str) -> Logits:
    """A tiny random ``{arch}ForImageClassification`` (28x28 grey images, patch 7, 10 labels)."""
    config = getattr(transformers, f"{ARCHS[arch]}Config")(
        image_size=SHAPE[1], patch_size=7, num_channels=SHAPE[0], hidden_size=HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP, num_labels=10,
        layer_norm_eps=1e-6, initializer_range=0.2, architectures=[f"{ARCHS[arch]}ForImageClassification"],
    )  # fmt: skip
    torch.manual_seed(0)
    net = transformers.AutoModelForImageClassification.from_config(config, attn_implementation=impl)
    assert net.config._attn_implementation == impl
    return Logits(net).eval()


def layer_names(model: nn.Module, arch: str) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ == f"{ARCHS[arch]}Layer"]


class Spy(TorchFunctionMode):
    """Records what reaches ``functions`` after the defense's own mode (entered later, so it acts first):
    the first argument, or the ``attn_mask`` of ``F.scaled_dot_product_attention``."""

    def __init__(self, *functions):
        super().__init__()
        self.functions, self.seen = functions, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and func in self.functions:
            mask = kwargs.get("attn_mask")
            self.seen.append(None if mask is None else mask.detach().clone())
        elif func in self.functions:
            self.seen.append(args[0].detach().clone())
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------ discovery
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_one_attention_and_one_gelu_site_per_layer_found_by_interception(arch, impl):
    model = hf_model(arch, impl)
    assert not hasattr(model, "input_shape") and input_shape(model) == SHAPE  # from the HF config
    found = find_sites(model, ["attn", "gelu", "relu"])
    layers = layer_names(model, arch)
    assert len(layers) == LAYERS and found["relu"] == []
    for kind, how in (("attn", ATTN_HOW[impl]), ("gelu", "intercepted F.gelu")):
        sites = found[kind]
        assert [s.how for s in sites] == [how] * LAYERS, kind
        assert [[s for s in sites if s.name.startswith(layer + ".")] for layer in layers] == [
            [s] for s in sites
        ]
    listed = describe_sites(model, how=True)  # what `sinai sites` prints
    assert listed["attn"] == [f"{s.name} [{ATTN_HOW[impl]}]" for s in found["attn"]]
    assert listed["gelu"] == [f"{s.name} [intercepted F.gelu]" for s in found["gelu"]]


# ------------------------------------------------------------------------------ noise on, clean off
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_noise_changes_outputs_and_clean_restores_them_exactly(arch, impl):
    model = hf_model(arch, impl)
    x = images(4, SHAPE)
    with torch.no_grad():
        reference = model(x)
        for defense in ("SINAI-Attn:std=0.5", "SINAI-FFN", "SINAI"):
            defended = protect(model, defense, seed=0)
            assert {s.kind for s in defended.sites} == {"attn", "gelu"}.intersection(
                {"SINAI-Attn:std=0.5": {"attn"}, "SINAI-FFN": {"gelu"}, "SINAI": {"attn", "gelu"}}[defense]
            )
            a, b = defended(x), defended(x)
            assert not torch.allclose(a, reference, atol=1e-4) and not torch.allclose(a, b, atol=1e-4), (
                defense
            )
            with defended.clean():
                assert torch.equal(defended(x), reference)
            assert torch.equal(model(x), reference)  # the model called directly is never noised
            defended.remove()
        assert torch.equal(model(x), reference)
    x.requires_grad_(True)
    protect(model, "SINAI", seed=0)(x).sum().backward()  # white-box attacks differentiate through it
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ the same noise as timm
def timm_twin(hf: Logits) -> ImageClassifier:
    """A timm ViT with ``hf``'s weights (q, k, v stacked into qkv): the same function of [0, 1] images."""
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=SHAPE[1], patch_size=7, in_chans=SHAPE[0], num_classes=10, embed_dim=HIDDEN, depth=LAYERS,
        num_heads=HEADS, mlp_ratio=MLP / HIDDEN, qkv_bias=True,
    )  # fmt: skip
    w = {k.removeprefix("vit."): v for k, v in hf.net.state_dict().items()}
    state = {
        "cls_token": w["embeddings.cls_token"],
        "pos_embed": w["embeddings.position_embeddings"],
        "norm.weight": w["layernorm.weight"],
        "norm.bias": w["layernorm.bias"],
        "head.weight": w["classifier.weight"],
        "head.bias": w["classifier.bias"],
    }
    for p in ("weight", "bias"):
        state[f"patch_embed.proj.{p}"] = w[f"embeddings.patch_embeddings.projection.{p}"]
        for i in range(LAYERS):
            h, t = f"layers.{i}.", f"blocks.{i}."
            qkv = [w[f"{h}attention.{n}_proj.{p}"] for n in "qkv"]
            state |= {
                f"{t}attn.qkv.{p}": torch.cat(qkv),
                f"{t}attn.proj.{p}": w[f"{h}attention.o_proj.{p}"],
                f"{t}norm1.{p}": w[f"{h}layernorm_before.{p}"],
                f"{t}norm2.{p}": w[f"{h}layernorm_after.{p}"],
                f"{t}mlp.fc1.{p}": w[f"{h}mlp.fc1.{p}"],
                f"{t}mlp.fc2.{p}": w[f"{h}mlp.fc2.{p}"],
            }
    net.load_state_dict(state)
    return ImageClassifier(net, input_shape=SHAPE, num_classes=10, mean=(0.5,), std=(0.5,)).eval()


@pytest.mark.parametrize("defense", ["SINAI-Attn:std=1.0", "SINAI:attn.std=0.7,gelu.std=0.3,gelu.ratio=0.5"])
@pytest.mark.parametrize("impl", IMPLS)
@torch.no_grad()
def test_transformers_vit_gets_the_same_noise_as_a_timm_vit_with_equal_weights(impl, defense):
    hf = hf_model("vit", impl)
    twin = timm_twin(hf)
    x = images(4, SHAPE)
    assert torch.allclose(hf(x), twin(x), atol=1e-5)  # equal weights, equal function
    ours, theirs = protect(hf, defense, seed=3), protect(twin, defense, seed=3)
    assert [s.kind for s in ours.sites] == [s.kind for s in theirs.sites]
    assert {s.how for s in theirs.sites} <= {"hook attn_mask", "hook"}
    for _ in range(2):  # same seed, same draws in the same order: the same noise, forward after forward
        a = ours(x)
        assert torch.allclose(a, theirs(x), atol=1e-4) and not torch.allclose(a, hf(x), atol=1e-3)
    ours.reseed(4)
    assert not torch.allclose(ours(x), theirs(x), atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_attention_logit_noise_is_iid_gaussian_with_the_specs_std(arch, impl):
    model, std, n = hf_model(arch, impl), 2.0, 16
    x = images(n, SHAPE)
    defended = protect(model, f"SINAI-Attn:std={std}", seed=0)
    spied = (torch.softmax, F.softmax, torch.Tensor.softmax, F.scaled_dot_product_attention)
    noises = []
    for _ in range(2):
        clean, noisy = Spy(*spied), Spy(*spied)
        with clean:
            model(x)
        with noisy:
            defended(x)
        assert len(noisy.seen) == LAYERS
        if impl == "sdpa":  # the noise is SDPA's additive mask (the model passes none), at every layer
            assert all(s is None for s in clean.seen)
            noise = torch.stack(noisy.seen)
        else:  # the first layer's softmax sees clean logits + noise (later layers see earlier noise too)
            noise = noisy.seen[0] - clean.seen[0]
        tokens = clean.seen[0].shape[-1] if impl == "eager" else noise.shape[-1]
        assert noise.shape[-4:] == (n, HEADS, tokens, tokens)
        noises.append(noise)
        flat = noise.flatten().double()
        assert abs(flat.std().item() / std - 1) < 0.05
        assert abs(flat.mean().item()) < 5 * std / flat.numel() ** 0.5
    per_image = noises[0].transpose(0, -4).reshape(n, -1).double()  # independent across images...
    corr = torch.corrcoef(per_image)
    bound = 5 / per_image.shape[1] ** 0.5
    assert (corr - torch.eye(n, dtype=corr.dtype)).abs().max() < bound
    across = torch.corrcoef(torch.stack([noises[0].flatten(), noises[1].flatten()]).double())[0, 1]
    assert abs(across) < 5 / noises[0].numel() ** 0.5  # ... and across forwards


# ------------------------------------------------------------------------------ FFN selection
@pytest.mark.parametrize("ratio", [0.1, 0.37])
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_ffn_noises_exactly_the_smallest_pre_gelu_logits_per_sample(arch, ratio):
    model = hf_model(arch, "sdpa")
    x = images(5, SHAPE)
    reference = model(x)
    defended = protect(model, f"SINAI-FFN:std=1.0,ratio={ratio}", seed=0)
    assert [s.how for s in defended.sites] == ["intercepted F.gelu"] * LAYERS
    clean = []  # each activation module's input: the pre-GeLU logits of this very forward
    for site in defended.sites:
        site.module.register_forward_pre_hook(lambda m, args: clean.append(args[0].detach().clone()))
    spy = Spy(F.gelu)
    with spy:
        out = defended(x)
    assert len(spy.seen) == len(clean) == LAYERS and not torch.allclose(out, reference, atol=1e-4)
    for z, noised in zip(clean, spy.seen, strict=True):
        flat, changed = z.reshape(len(x), -1), (noised != z).reshape(len(x), -1)
        k = selected_count(ratio, flat.shape[1])
        # exactly k per image, all below the k-th value and any of those equal to it (ties: any choice)
        kth = flat.kthvalue(k, dim=1).values[:, None]
        assert (changed.sum(1) == k).all()
        assert (changed <= (flat <= kth)).all() and ((flat < kth) <= changed).all()


# ------------------------------------------------------------------------------ no shape, clear error
def test_traced_sites_need_an_image_shape_and_the_error_says_so():
    class Bare(nn.Module):  # attention written out by hand, no input_shape and no config
        def __init__(self):
            super().__init__()
            self.qk, self.head = nn.Linear(4, 8), nn.Linear(64, 10)

        def forward(self, x):
            t = x.reshape(len(x), 16, 4)
            q, k = self.qk(t).chunk(2, -1)
            return self.head(((q @ k.transpose(-2, -1)).softmax(-1) @ t).flatten(1))

    model = Bare()
    with pytest.raises(ValueError, match=r"needs \['attn'\] sites.*set model.input_shape = \(C, H, W\)"):
        protect(model, "SINAI-Attn")
    model.input_shape = (1, 8, 8)
    assert [s.how for s in protect(model, "SINAI-Attn").sites] == ["intercepted softmax"]
