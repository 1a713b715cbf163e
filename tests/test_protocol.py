"""The robust-accuracy protocol: results, resume after a crash, no recomputation, seeds."""

import pytest

import sinai.evaluation.protocol as protocol
from sinai.evaluation.protocol import evaluate
from sinai.evaluation.store import ResultStore

ARGS = dict(attack="square", norm="linf", eps=0.3, budgets=(10, 60), shard_size=15, progress=False)


@pytest.fixture(scope="module")
def setup(mnist_models, mnist_images):
    x, y = mnist_images
    return mnist_models["mnist-vit"], x[:30], y[:30]


def as_tuples(result):
    return [
        (r.image, r.clean_correct, r.success_at, r.queries, r.vote_passes, round(r.norm, 6))
        for r in result.results
    ]


def test_results_follow_the_protocol(setup, tmp_path):
    model, x, y = setup
    result = evaluate(model, x, y, store=ResultStore(tmp_path / "r.sqlite"), **ARGS)
    assert len(result.results) == 30 and result.clean == (pytest.approx(result.clean[0]),)
    wrong = [r for r in result.results if not r.clean_correct]
    assert wrong, "the short-trained ViT misclassifies some images"
    assert all(r.queries == 0 and r.success_at is None and not r.robust_at(60) for r in wrong)
    for r in result.results:
        assert r.queries <= 60
        if r.success_at is not None:
            assert 1 <= r.success_at <= r.queries and r.norm <= 0.3 + 1e-6
    assert result.robust_accuracy(10) >= result.robust_accuracy(60)
    clean = sum(r.clean_correct for r in result.results) / 30
    assert result.robust_accuracy(60) < clean  # Square breaks some images within 100 queries


def test_resume_after_a_crash_gives_identical_results(setup, tmp_path, monkeypatch):
    model, x, y = setup
    reference = evaluate(model, x, y, **ARGS)
    store = ResultStore(tmp_path / "r.sqlite")
    real_add = ResultStore.add_results
    calls = []

    def crash_on_second_shard(self, run_id, results):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_add(self, run_id, results)

    monkeypatch.setattr(ResultStore, "add_results", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, x, y, store=store, **ARGS)
    monkeypatch.setattr(ResultStore, "add_results", real_add)
    run_id = store.runs()[0][0]
    assert len(store.results(run_id)) == 15  # the first shard survived the crash
    resumed = evaluate(model, x, y, store=store, **ARGS)
    assert as_tuples(resumed) == as_tuples(reference)

    def no_attack(*a, **k):
        raise AssertionError("a finished run was attacked again")

    monkeypatch.setattr(protocol, "Oracle", no_attack)
    again = evaluate(model, x, y, store=store, **ARGS)
    assert as_tuples(again) == as_tuples(reference)


def test_same_seed_same_trace_and_other_settings_make_another_run(setup, tmp_path):
    model, x, y = setup
    store = ResultStore(tmp_path / "r.sqlite")
    a = evaluate(model, x, y, defense="RND:std=0.05", store=store, **ARGS)
    b = evaluate(model, x, y, defense="RND:std=0.05", **ARGS)
    assert as_tuples(a) == as_tuples(b) and a.clean == b.clean and len(a.clean) == 3
    assert sum(r.vote_passes for r in a.results) > 0  # a randomized model's successes are verified
    c = evaluate(model, x, y, defense="RND:std=0.05", store=store, **(ARGS | {"seed": 1}))
    assert as_tuples(c) != as_tuples(a)
    assert len(store.runs()) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budgets": (0,)}, "budgets must be positive"),
        ({"attack": "nope"}, "unknown attack"),
        ({"eps": 0.0}, "eps must be a positive"),
        ({"eps": 2.0}, "larger than the pixel range"),
        ({"norm": "l1"}, "unknown norm"),
    ],
)
def test_bad_settings_are_clear_errors(setup, kwargs, message):
    model, x, y = setup
    with pytest.raises(ValueError, match=message):
        evaluate(model, x, y, **(ARGS | kwargs))


def test_a_store_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    path.write_text("not a database" * 100)
    with pytest.raises(ValueError, match="not a sinai result store"):
        ResultStore(path)
