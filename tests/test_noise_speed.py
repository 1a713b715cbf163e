"""The fast noise path keeps SINAI's semantics: statistics of the noise, never timings.

Fresh i.i.d. N(0, std^2) noise on exactly ceil(ratio * n) smallest logits of each sample, independent across
images, forwards and sites (the fused path draws only the selected entries and adds them in one scatter).
"""

import math

import pytest
import torch
from conftest import images
from scipy import stats
from torch import nn

from sinai.defenses import Defense, NoiseSpec, protect, selected_count
from sinai.defenses.protect import smallest_indices, smallest_mask
from sinai.models.classifier import ImageClassifier

N_FEATURES = 500


def relu_model(n: int = N_FEATURES, sites: int = 1) -> tuple[ImageClassifier, list[nn.ReLU], nn.Linear]:
    """Linear -> ReLU (-> Identity -> ReLU ...): each ReLU site sees the same pre-activation logits."""
    torch.manual_seed(0)
    linear = nn.Linear(16, n)
    relus = [nn.ReLU() for _ in range(sites)]
    layers: list[nn.Module] = [nn.Flatten(), linear]
    for relu in relus:
        layers += [_Tap(), relu]
    net = nn.Sequential(*layers)
    return (
        ImageClassifier(net, input_shape=(1, 4, 4), num_classes=n, mean=(0.0,), std=(1.0,)).eval(),
        relus,
        linear,
    )


class _Tap(nn.Module):
    """Hands every site the clean linear output (so that each site's noise can be read off alone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clean = getattr(self, "clean", x)
        return self.clean


def noise_seen(defended, relus, x, z) -> list[torch.Tensor]:
    """The noise each ReLU site received on one forward (its input minus the clean logits)."""
    seen = []
    handles = [r.register_forward_pre_hook(lambda m, a: seen.append(a[0] - z)) for r in relus]
    for tap in defended.model.net:
        if isinstance(tap, _Tap):
            tap.clean = z
    defended(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("ratio", [0.05, 0.37, 0.7, 0.999])
@torch.no_grad()
def test_exactly_ceil_ratio_n_entries_per_sample_get_noise_on_the_smallest(ratio):
    model, relus, linear = relu_model()
    x = images(32, (1, 4, 4))
    z = linear(x.flatten(1))
    defended = protect(model, Defense({"relu": NoiseSpec(std=0.5, ratio=ratio)}), seed=0)
    (noise,) = noise_seen(defended, relus, x, z)
    k = selected_count(ratio, N_FEATURES)
    assert ((noise != 0).sum(1) == k).all()
    kth = z.kthvalue(k, dim=1).values[:, None]
    assert ((noise != 0) <= (z <= kth)).all() and ((z < kth) <= (noise != 0)).all()


@torch.no_grad()
def test_selection_helpers_agree_under_ties():
    z = torch.tensor([[3.0, 1.0, 1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    for ratio in (0.2, 0.5, 0.8):
        idx, mask = smallest_indices(z, ratio), smallest_mask(z, ratio)
        k = selected_count(ratio, 6)
        assert idx.shape == (2, k) and (mask.sum(1) == k).all()
        assert torch.equal(torch.zeros_like(mask).scatter_(1, idx, True), mask)  # the same topk choice
    assert smallest_indices(z, 1.0) is None


@pytest.mark.parametrize("ratio", [0.37, 1.0])
@torch.no_grad()
def test_noise_is_centred_gaussian_with_the_requested_std(ratio):
    model, relus, linear = relu_model()
    x = images(64, (1, 4, 4))
    z = linear(x.flatten(1))
    std = 0.3
    defended = protect(model, Defense({"relu": NoiseSpec(std=std, ratio=ratio)}), seed=1)
    values = torch.cat([n[n != 0] for _ in range(3) for n in noise_seen(defended, relus, x, z)]).double()
    count = len(values)
    assert count == 3 * 64 * selected_count(ratio, N_FEATURES)
    assert abs(values.mean().item()) < 4 * std / math.sqrt(count)
    assert abs(values.std().item() / std - 1) < 4 / math.sqrt(2 * count)
    for sigmas, share in ((1, 0.6827), (2, 0.9545)):  # the shape of a Gaussian, not just its moments
        inside = (values.abs() < sigmas * std).double().mean().item()
        assert abs(inside - share) < 4 * math.sqrt(share * (1 - share) / count)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@torch.no_grad()
def test_noise_is_independent_across_images_forwards_and_sites():
    model, relus, linear = relu_model(sites=2)
    x = images(1, (1, 4, 4)).repeat(8, 1, 1, 1)  # the same image 8 times: the same entries are selected
    z = linear(x.flatten(1))
    defended = protect(model, Defense({"relu": NoiseSpec(std=1.0, ratio=0.37)}), seed=2)
    first_a, first_b = noise_seen(defended, relus, x, z)
    second_a, _ = noise_seen(defended, relus, x, z)
    selected = first_a[0] != 0
    assert torch.equal(selected, first_a[1] != 0)  # same logits, same selection...
    bound = 4 / math.sqrt(selected.sum().item())  # ...but no correlation of the noise drawn there
    pick = lambda t: t[:, selected]  # noqa: E731
    for i in range(1, 8):
        assert abs(_correlation(pick(first_a)[0], pick(first_a)[i])) < bound  # across images
    assert abs(_correlation(pick(first_a), pick(second_a))) < bound / math.sqrt(8)  # across forwards
    assert abs(_correlation(pick(first_a), pick(first_b))) < bound / math.sqrt(8)  # across sites
    assert not torch.equal(first_a, second_a)


@torch.no_grad()
def test_same_seed_same_noise_and_autograd_sees_the_same_selection_and_distribution():
    model, relus, linear = relu_model()
    x = images(64, (1, 4, 4))
    z = linear(x.flatten(1))
    spec = Defense({"relu": NoiseSpec(std=0.5, ratio=0.37)})
    a = noise_seen(protect(model, spec, seed=5), relus, x, z)[0]
    b = noise_seen(protect(model, spec, seed=5), relus, x, z)[0]
    assert torch.equal(a, b)
    with torch.enable_grad():  # logits that need a gradient take the differentiable torch path
        c = noise_seen(protect(model, spec, seed=5), relus, x, z.clone().requires_grad_())[0].detach()
    assert torch.equal(a != 0, c != 0)
    assert stats.ks_2samp(a[a != 0].numpy(), c[c != 0].numpy()).pvalue > 1e-3


@torch.no_grad()
def test_vector_std_scales_each_selected_feature():
    model, relus, linear = relu_model(n=4)
    x = images(1, (1, 4, 4)).repeat(4000, 1, 1, 1)
    z = linear(x.flatten(1))
    std = (0.1, 0.5, 1.0, 2.0)
    defended = protect(model, Defense({"relu": NoiseSpec(std=std, ratio=0.5)}), seed=0)
    noise = noise_seen(defended, relus, x, z)[0]
    chosen = (noise != 0).any(0)
    assert chosen.sum() == 2
    for j in torch.nonzero(chosen).flatten().tolist():
        assert abs(noise[:, j].std().item() / std[j] - 1) < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_order_keys_sort_like_the_floats(dtype):
    from sinai.defenses.protect import order_keys

    values = torch.cat(
        [torch.randn(2000) * 10, torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf")])]
    )
    values = values.to(dtype)
    keys = order_keys(values[None])[0]
    by_keys = values[keys.argsort(stable=True)].float()
    assert (by_keys[1:] >= by_keys[:-1]).all()  # non-decreasing: the same order as the floats
    for ratio in (0.1, 0.5):
        idx = smallest_indices(values[None], ratio)[0]
        k = selected_count(ratio, len(values))
        assert torch.equal(values[idx].float().sort().values, values.float().sort().values[:k])
