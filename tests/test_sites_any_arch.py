"""Site discovery beyond timm: torchvision's nn.MultiheadAttention, attention written out by hand, SDPA and
functional activations inside a module's forward (intercepted), with the same noise as timm's sites."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import images, tiny_vit
from torch import nn
from torch.overrides import TorchFunctionMode

from sinai.defenses import Defense, NoiseSpec, describe_sites, find_sites, protect, selected_count
from sinai.models.classifier import ImageClassifier


# ------------------------------------------------------------------------------ hand-written models
class HandAttention(nn.Module):
    """Attention as research code writes it: ``(q @ k^T) * scale`` then ``.softmax(-1)`` (or SDPA)."""

    def __init__(self, dim: int, heads: int, *, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.scale, self.sdpa = heads, (dim // heads) ** -0.5, sdpa
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class HandBlock(nn.Module):
    """A pre-norm transformer block with ``F.gelu`` in its own forward, weights copied from a timm Block."""

    def __init__(self, block: nn.Module, *, sdpa: bool = False) -> None:
        super().__init__()
        dim = block.attn.qkv.in_features
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.attn = HandAttention(dim, block.attn.num_heads, sdpa=sdpa)
        self.attn.qkv.load_state_dict(block.attn.qkv.state_dict())
        self.attn.proj.load_state_dict(block.attn.proj.state_dict())
        self.fc1, self.fc2 = block.mlp.fc1, block.mlp.fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def timm_and_hand(*, sdpa: bool = False) -> tuple[ImageClassifier, ImageClassifier]:
    """A tiny timm ViT and the same network with every block written out by hand (equal weights)."""
    torch.manual_seed(0)
    timm_model = tiny_vit(qkv_bias=True)
    torch.manual_seed(0)
    hand = tiny_vit(qkv_bias=True)
    hand.net.blocks = nn.Sequential(*[HandBlock(b, sdpa=sdpa) for b in timm_model.net.blocks])
    return timm_model, hand.eval()


class Spy(TorchFunctionMode):
    """Records the first argument of every call of ``functions`` (outside the defense's own mode)."""

    def __init__(self, *functions):
        super().__init__()
        self.functions, self.seen = functions, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.functions:
            self.seen.append(args[0].detach().clone())
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------ discovery
def test_hand_written_attention_and_functional_gelu_are_intercepted_sites():
    _, hand = timm_and_hand()
    found = find_sites(hand, ["attn", "gelu", "relu"])
    assert [s.name for s in found["attn"]] == ["net.blocks.0.attn", "net.blocks.1.attn"]
    assert [s.name for s in found["gelu"]] == ["net.blocks.0", "net.blocks.1"]
    assert {s.how for s in found["attn"]} == {"intercepted softmax"}
    assert {s.how for s in found["gelu"]} == {"intercepted F.gelu"}
    assert found["relu"] == []
    listed = describe_sites(hand, how=True)
    assert listed["attn"][0] == "net.blocks.0.attn [intercepted softmax]"
    assert describe_sites(tiny_vit(), how=True)["attn"][0].endswith("[hook attn_mask]")


def test_torchvision_vit_has_attention_and_gelu_sites():
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )
    nn.init.normal_(net.heads.head.weight)  # torchvision zero-initialises the head
    model = ImageClassifier(net, input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    model.eval()
    found = find_sites(model, ["attn", "gelu"])
    assert len(found["attn"]) == 2 and {s.hook for s in found["attn"]} == {"mha_mask"}
    assert len(found["gelu"]) == 2
    x = images(3, (3, 32, 32))
    with torch.no_grad():
        clean = model(x)
        for name in ("SINAI", "SINAI-Attn", "SINAI-FFN"):
            defended = protect(model, name, seed=0)
            a, b = defended(x), defended(x)
            assert not torch.allclose(a, clean) and not torch.allclose(a, b), name
            defended.remove()
        assert torch.equal(model(x), clean)


def test_softmax_over_logits_and_a_cnn_are_not_attention():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 14 * 14, 10)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).flatten(1)).softmax(-1)

    model = ImageClassifier(Net(), input_shape=(1, 16, 16), num_classes=10, mean=(0.5,), std=(0.5,))
    found = find_sites(model, ["attn", "relu"])
    assert found["attn"] == [] and [(s.name, s.how) for s in found["relu"]] == [("net", "intercepted F.relu")]
    with pytest.raises(ValueError, match=r"needs \['attn'\] sites, but the model has none"):
        protect(model, "SINAI-Attn")


# ------------------------------------------------------------------------------ same noise as timm's sites
@pytest.mark.parametrize("defense", ["SINAI-Attn:std=1.0", "SINAI:attn.std=0.7,gelu.std=0.3,gelu.ratio=0.5"])
@pytest.mark.parametrize("sdpa", [False, True])
@torch.no_grad()
def test_hand_written_blocks_get_the_same_noise_as_timm_blocks(defense, sdpa):
    timm_model, hand = timm_and_hand(sdpa=sdpa)
    x = images(4)
    assert torch.allclose(timm_model(x), hand(x), atol=1e-5)  # equal weights, equal function
    ours, theirs = protect(timm_model, defense, seed=3), protect(hand, defense, seed=3)
    assert [s.kind for s in ours.sites] == [s.kind for s in theirs.sites]
    for _ in range(2):  # same seed, same draws in the same order: the same noise, forward after forward
        a, b = ours(x), theirs(x)
        assert torch.allclose(a, b, atol=1e-4)
        assert not torch.allclose(a, timm_model(x), atol=1e-3)
    ours.reseed(4)
    assert not torch.allclose(ours(x), theirs(x), atol=1e-3)


@torch.no_grad()
def test_multihead_attention_noise_lands_on_each_image_and_head_as_at_a_hand_written_block():
    torch.manual_seed(0)
    dim, heads = 16, 4
    mha = nn.MultiheadAttention(dim, heads, batch_first=True)
    hand = HandAttention(dim, heads)
    hand.qkv.weight.copy_(mha.in_proj_weight)
    hand.qkv.bias.copy_(mha.in_proj_bias)
    hand.proj.load_state_dict(mha.out_proj.state_dict())

    class Tokens(nn.Module):
        def __init__(self, attn, own):
            super().__init__()
            self.attn, self.own, self.head = attn, own, nn.Linear(dim, 10)
            torch.manual_seed(1)
            self.head.reset_parameters()

        def forward(self, x):
            t = x.reshape(x.shape[0], dim, -1).transpose(1, 2)  # (B, 16 tokens, 16 dims)
            t = t + (self.attn(t, t, t, need_weights=False)[0] if self.own else self.attn(t))
            return self.head(t.mean(1))

    wrap = lambda net: ImageClassifier(net, input_shape=(1, 16, 16), num_classes=10, mean=(0.5,), std=(0.5,))
    a, b = wrap(Tokens(mha, True)).eval(), wrap(Tokens(hand, False)).eval()
    x = images(3)
    assert torch.allclose(a(x), b(x), atol=1e-5)
    da, db = protect(a, "SINAI-Attn:std=2.0", seed=0), protect(b, "SINAI-Attn:std=2.0", seed=0)
    assert [s.how for s in da.sites] == ["hook mha_mask"] and [s.how for s in db.sites] == [
        "intercepted softmax"
    ]
    out = da(x)
    assert torch.allclose(out, db(x), atol=1e-4) and not torch.allclose(out, a(x), atol=1e-3)


# ------------------------------------------------------------------------------ functional activations
class FunctionalMlp(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.inplace = nn.Linear(16, 40), nn.Linear(40, 10), inplace

    def forward(self, x):
        z = self.fc1(x.flatten(1))
        if self.inplace:
            z.relu_()
            return self.fc2(z)
        return self.fc2(F.relu(z))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("ratio", [0.1, 0.37, 1.0])
@torch.no_grad()
def test_intercepted_relu_noises_exactly_the_smallest_logits_per_sample(ratio, inplace):
    torch.manual_seed(0)
    model = ImageClassifier(
        FunctionalMlp(inplace), input_shape=(1, 4, 4), num_classes=10, mean=(0.0,), std=(1.0,)
    )
    x = images(6, (1, 4, 4))
    z = model.net.fc1(x.flatten(1))
    defended = protect(model, Defense({"relu": NoiseSpec(std=1.0, ratio=ratio)}), seed=0)
    assert [s.how for s in defended.sites] == ["intercepted F.relu"]
    spy = Spy(F.relu, torch.Tensor.relu_)
    with spy:
        out = defended(x)
    assert len(spy.seen) == 1 and not torch.allclose(out, model(x))
    noised = spy.seen[0] != z
    k = selected_count(ratio, 40)
    for i in range(6):
        assert set(torch.nonzero(noised[i]).flatten().tolist()) == set(
            z[i].topk(k, largest=False).indices.tolist()
        )


@torch.no_grad()
def test_intercepted_sites_act_only_inside_the_defended_forward_and_in_their_own_module():
    _, hand = timm_and_hand()
    x = images(2)
    reference = hand(x)
    defended = protect(hand, "SINAI", seed=0)
    with defended.clean():
        assert torch.equal(defended(x), reference)
    assert torch.equal(hand(x), reference)
    assert not torch.allclose(defended(x), reference)
    defended.remove()
    assert torch.equal(hand(x), reference)

    # F.gelu inside an nn.GELU child is the child's hooked site, not its parent's intercepted one
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 10)

        def forward(self, x):
            return self.out(self.act(self.fc(x.flatten(1))))

    model = ImageClassifier(Parent(), input_shape=(1, 4, 4), num_classes=10, mean=(0.0,), std=(1.0,))
    assert [(s.name, s.how) for s in find_sites(model, ["gelu"])["gelu"]] == [("net.act", "hook")]


def test_intercepted_noise_is_fresh_per_image_and_per_forward():
    _, hand = timm_and_hand()
    x = images(1).repeat(3, 1, 1, 1)
    defended = protect(hand, "SINAI", seed=0)
    with torch.no_grad():
        a, b = defended(x), defended(x)
    assert not torch.allclose(a, b) and not torch.allclose(a[0], a[1]) and not torch.allclose(a[1], a[2])


def test_intercepted_sites_keep_gradients_for_white_box_attacks():
    _, hand = timm_and_hand()
    x = images(2).requires_grad_(True)
    protect(hand, "SINAI", seed=0)(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_transformers_vit_has_attention_and_gelu_sites():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=10,
    )  # fmt: skip

    class Logits(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.vit = transformers.ViTForImageClassification(config).eval()

        def forward(self, x):
            return self.vit(pixel_values=x).logits

    model = ImageClassifier(
        Logits(), input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    found = find_sites(model, ["attn", "gelu"])
    assert len(found["attn"]) == 2 and len(found["gelu"]) == 2
    x = images(2, (3, 32, 32))
    with torch.no_grad():
        assert not torch.allclose(protect(model, "SINAI", seed=0)(x), model(x))


def test_site_listing_mentions_how_each_site_is_reached():
    net = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model = ImageClassifier(net, input_shape=(3, 32, 32), num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    listed = describe_sites(model, how=True)
    assert listed["relu"] and all(name.endswith("[hook]") for name in listed["relu"]) and listed["attn"] == []


def test_discovery_forward_leaves_the_models_hooks_and_modes_alone():
    _, hand = timm_and_hand()
    hand.train()
    fired = []
    hand.net.blocks[0].register_forward_hook(lambda m, a, out: fired.append(1))
    protect(hand, "SINAI", seed=0)
    assert fired == [] and all(m.training for m in hand.modules())
    hand(images(2))
    assert fired == [1]


def test_discovery_forward_leaves_the_global_random_streams_alone():
    class Noisy(nn.Module):
        def forward(self, x):
            return F.relu(x.flatten(1) + torch.randn_like(x.flatten(1)))

    model = ImageClassifier(Noisy(), input_shape=(1, 4, 4), num_classes=16, mean=(0.0,), std=(1.0,))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert [s.how for s in find_sites(model, ["relu"])["relu"]] == ["intercepted F.relu"]
    assert torch.equal(torch.rand(3), expected)
