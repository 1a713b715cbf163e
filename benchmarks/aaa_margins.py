"""docs/aaa.md: the embedded CNN's top-1 / top-2 margins and how closely AAA reaches its targets."""

import time

import torch

from sinai.defenses import protect
from sinai.defenses.aaa import margin_targets
from sinai.defenses.spec import AAASpec
from sinai.models.data import mnist, sample
from sinai.models.zoo import load_model


def margins(z: torch.Tensor) -> torch.Tensor:
    top = z.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


model = load_model("mnist-cnn", progress=False)
x, _ = sample(mnist("test"), 1000, seed=0)
with torch.no_grad():
    base = model(x)
    m0 = margins(base)
    q = torch.tensor([0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    print(
        "margin quantiles", [round(v, 2) for v in m0.quantile(q).tolist()], "mean", round(m0.mean().item(), 2)
    )
    print(f"below tau 6: {(m0 < 6).float().mean():.1%}, below 12: {(m0 < 12).float().mean():.1%}")
    for variant in ("linear", "sine"):
        defended = protect(model, f"AAA:variant={variant}")
        out = defended(x)
        off = (margins(out) - margin_targets(m0, AAASpec(variant=variant))).abs()
        kept = int((out.argmax(1) == base.argmax(1)).sum())
        print(
            variant,
            f"predictions kept {kept}/1000, fallbacks {defended._injectors[0].fallbacks},",
            "|margin - target| median / 90% / 99%:",
            [round(v, 3) for v in off.quantile(torch.tensor([0.5, 0.9, 0.99])).tolist()],
        )
    defended = protect(model, "AAA")
    for n in (50, 1000):
        start = time.perf_counter()
        for _ in range(5):
            defended(x[:n])
        print(f"{n} images: {1000 * (time.perf_counter() - start) / 5:.0f} ms per answer")
