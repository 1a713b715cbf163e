"""`sinai bench --bf16 / --channels-last`: the timed forwards really run in that setting."""

import torch
from conftest import images, tiny_cnn

from sinai.bench.defenses import measure_overhead
from sinai.bench.precision import Precision


def test_bf16_and_channels_last_reach_the_model_and_its_defended_forwards():
    model = tiny_cnn()
    x = images(8)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    seen: list[tuple[torch.dtype, bool]] = []
    conv.register_forward_hook(
        lambda m, args, out: seen.append(
            (out.dtype, args[0].is_contiguous(memory_format=torch.channels_last))
        )
    )
    rows = measure_overhead(
        model, x, ["RND", "SINAI"], rounds=1, iters=1, precision=Precision(bf16=True, channels_last=True)
    )
    assert [r.defense for r in rows] == ["RND", "SINAI"]
    assert seen and all(dtype == torch.bfloat16 and last for dtype, last in seen)
    seen.clear()
    measure_overhead(model, x, ["RND"], rounds=1, iters=1)  # the default: float32 as given
    assert seen and all(dtype == torch.float32 for dtype, _ in seen)


def test_the_autocast_wrapper_returns_float32_logits_for_the_oracle():
    model = tiny_cnn()
    wrapped = Precision(bf16=True).wrap(model)
    out = wrapped(images(4))
    assert out.dtype == torch.float32 and wrapped.num_classes == model.num_classes
    assert Precision().wrap(model) is model
    assert Precision(bf16=True, channels_last=True).describe() == "bf16 autocast, channels_last"
