"""Clean accuracy over noisy passes, and the overhead benchmark's bookkeeping (no timing assertions)."""

import pytest
import torch
from conftest import images, tiny_cnn, tiny_vit

from sinai.bench.defenses import bench_defense, measure_overhead
from sinai.defenses import protect
from sinai.evaluation.clean import clean_accuracy, predict


def labelled(model, n=64, seed=0):
    x = images(n, seed=seed)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[: n // 4] = (y[: n // 4] + 1) % 10  # a quarter wrong on purpose
    return x, y


def test_undefended_accuracy_is_exact_and_has_no_spread():
    model = tiny_cnn()
    x, y = labelled(model)
    acc = clean_accuracy(model, x, y, passes=3)
    assert acc.mean == pytest.approx(0.75) and acc.std == 0.0 and acc.per_pass == (0.75,) * 3


def test_noisy_passes_differ_and_the_seed_reproduces_them():
    model = tiny_vit()
    x, y = labelled(model, 128)
    accs = [clean_accuracy(protect(model, "SINAI-Attn:std=4", seed=1), x, y, passes=3) for _ in range(2)]
    assert accs[0] == accs[1]
    assert accs[0].std > 0 and len(set(accs[0].per_pass)) > 1
    assert accs[0].mean < 0.75  # strong noise costs accuracy


def test_predict_batches_agree_with_one_batch():
    model = tiny_cnn()
    x, _ = labelled(model, 50)
    assert torch.equal(predict(model, x, batch_size=7), predict(model, x, batch_size=50))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"passes": 0}, "passes must be"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels must have shape"),
        ({"labels": torch.full((64,), 10)}, r"labels must be in \[0, 9\]"),
    ],
)
def test_clean_accuracy_rejects_bad_input(kwargs, message):
    model = tiny_cnn()
    x, y = labelled(model)
    args = {"labels": y, "passes": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        clean_accuracy(model, x, args.pop("labels"), **args)


def test_overhead_rows_cover_applicable_presets_and_leave_the_model_clean():
    model = tiny_cnn()
    x = images(8)
    before = model(x)
    rows = measure_overhead(
        model, x, ["RND", "FND", "SINAI-Attn", "SINAI", "SINAI@threshold"], rounds=2, iters=1
    )
    assert [r.defense for r in rows] == ["RND", "FND", "SINAI", "SINAI@threshold"]  # no attention in a CNN
    assert all(r.ratio > 0 and r.batch == 8 and r.sites >= 1 for r in rows)
    assert torch.equal(model(x), before)


def test_threshold_variant_and_unknown_variant():
    assert all(s.selection == "threshold" for s in bench_defense("SINAI@threshold").specs.values())
    with pytest.raises(ValueError, match="unknown variant"):
        bench_defense("SINAI@fast")


def test_attack_throughput_bookkeeping_over_rounds():
    from sinai.bench.attacks import measure_attacks

    model = tiny_cnn()
    x, y = labelled(model, 16)
    (row,) = measure_attacks(model, x, y, ["square"], budget=12, rounds=3, batch_size=8)
    # 16 images x at most 12 counted queries each
    assert 0 < row.queries <= 16 * 12 and row.images == 16
    assert row.ratio_min <= row.ratio <= row.ratio_max
    assert row.queries_per_s == pytest.approx(row.queries / row.seconds)
    assert 0 < row.forward_share <= 1  # the model's forwards are part of the attack's wall time
    with pytest.raises(ValueError, match="rounds"):
        measure_attacks(model, x, y, ["square"], rounds=0)


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 0.5)])
def test_the_forward_rate_is_taken_on_images_like_the_queries(norm, eps):
    """The reference forward rate runs on the clean images moved to the ball's edge (seeded), in [0, 1]."""
    from sinai.attacks import ThreatModel
    from sinai.bench.attacks import query_like

    x = images(8, seed=3)
    probe = query_like(x, ThreatModel(norm, eps), seed=1)
    step = (probe - x).flatten(1)
    assert probe.min() >= 0 and probe.max() <= 1 and not torch.equal(probe, x)
    if norm == "linf":
        assert step.abs().amax(1).max() <= eps + 1e-6
        inside = (x > eps) & (x < 1 - eps)  # the clamp leaves these at exactly +-eps
        assert torch.allclose((probe - x)[inside].abs(), torch.full_like((probe - x)[inside], eps))
    else:
        assert (step.norm(dim=1) <= eps + 1e-5).all()
    assert torch.equal(probe, query_like(x, ThreatModel(norm, eps), seed=1))
    assert not torch.equal(probe, query_like(x, ThreatModel(norm, eps), seed=2))


def test_square_peer_comparison_times_every_installed_tool():
    from sinai.bench.attacks import compare_square

    model = tiny_cnn()
    x, y = labelled(model, 12)
    rows = compare_square(model, x, y, eps=0.3, budget=20, rounds=2, batch_size=8)
    tools = [r.tool for r in rows]
    assert tools[0] == "sinai Square"
    assert set(tools) <= {"sinai Square", "torchattacks Square", "ART SquareAttack"}
    assert all(r.images == 12 and r.seconds > 0 and 0 <= r.success_rate <= 1 for r in rows)
    # the quarter of images mislabelled on purpose are successes at their first query
    assert rows[0].success_rate >= 0.25
    with pytest.raises(ValueError, match="rounds"):
        compare_square(model, x, y, rounds=0)
