"""The robust-accuracy protocol: results, resume after a crash, no recomputation, seeds."""

import pytest

import sinai.evaluation.protocol as protocol
from sinai.attacks.threat import ThreatModel
from sinai.defenses import parse_defense
from sinai.evaluation.config import EvalConfig
from sinai.evaluation.protocol import evaluate
from sinai.evaluation.store import ResultStore

CONFIG = dict(attack="square", threat=ThreatModel("linf", 0.3), budgets=(10, 60), shard_size=15)
RND = parse_defense("RND:std=0.05")


def run(model, x, y, store=None, **changes):
    return evaluate(model, x, y, EvalConfig(**(CONFIG | changes)), store=store, progress=False)


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
    result = run(model, x, y, ResultStore(tmp_path / "r.sqlite"))
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
    reference = run(model, x, y)
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
        run(model, x, y, store)
    monkeypatch.setattr(ResultStore, "add_results", real_add)
    run_id = store.runs()[0][0]
    assert len(store.results(run_id)) == 15  # the first shard survived the crash
    resumed = run(model, x, y, store)
    assert as_tuples(resumed) == as_tuples(reference)

    def no_attack(*a, **k):
        raise AssertionError("a finished run was attacked again")

    monkeypatch.setattr(protocol, "Oracle", no_attack)
    again = run(model, x, y, store)
    assert as_tuples(again) == as_tuples(reference)


def test_same_seed_same_trace_and_other_settings_make_another_run(setup, tmp_path):
    model, x, y = setup
    store = ResultStore(tmp_path / "r.sqlite")
    a = run(model, x, y, store, defense=RND)
    b = run(model, x, y, defense=RND)
    assert as_tuples(a) == as_tuples(b) and a.clean == b.clean and len(a.clean) == 3
    assert sum(r.vote_passes for r in a.results) > 0  # a randomized model's successes are verified
    c = run(model, x, y, store, defense=RND, seed=1)
    assert as_tuples(c) != as_tuples(a)
    assert len(store.runs()) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budgets": (0,)}, "budgets must be positive"),
        ({"attack": "nope"}, "unknown attack"),
        ({"attack_args": {"p_inti": 0.1}}, "square has no parameter 'p_inti'"),
        ({"eot": 0}, "eot must be an integer >= 1"),
        ({"votes": -1}, "votes must be an integer >= 1"),
        ({"shard_size": 0}, "shard_size must be an integer >= 1"),
        ({"describe": {"seed": "x"}}, "may not redefine"),
    ],
)
def test_bad_settings_are_clear_errors_when_the_config_is_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**(CONFIG | kwargs))


@pytest.mark.parametrize(
    ("norm", "eps", "message"),
    [
        ("linf", 0.0, "eps must be a positive"),
        ("linf", 2.0, "larger than the pixel range"),
        ("l1", 0.1, "unknown norm"),
    ],
)
def test_bad_threat_models_are_clear_errors(norm, eps, message):
    with pytest.raises(ValueError, match=message):
        ThreatModel(norm, eps)


def test_the_run_is_stored_under_its_config_and_the_defense_the_model_has(setup, tmp_path):
    model, x, y = setup
    store = ResultStore(tmp_path / "r.sqlite")
    sinai = parse_defense("SINAI:attn.std=0.2,gelu.std=0.1,gelu.ratio=0.5")  # relu.* on a ViT is an error
    result = run(model, x[:15], y[:15], store, defense=sinai, budgets=(10,), describe={"model": "vit"})
    ((_, settings, finished),) = store.runs()
    assert finished and settings == result.settings and settings["schema"] == 2
    assert settings["attack"] == "square" and settings["attack_args"] == {}
    assert settings["threat"] == {"norm": "linf", "eps": 0.3} and settings["model"] == "vit"
    assert sorted(settings["defense"]["specs"]) == ["attn", "gelu"]  # the ViT has no ReLU
    assert result.config.defense.to_dict() == settings["defense"]


def test_a_store_of_an_older_version_is_refused_not_silently_restarted(tmp_path):
    import sqlite3

    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, key TEXT, settings TEXT)")
    with pytest.raises(ValueError, match="store schema 1, this version reads 2"):
        ResultStore(path)
    ResultStore(tmp_path / "new.sqlite").close()
    ResultStore(tmp_path / "new.sqlite").close()  # reopening a current store is fine


def test_a_store_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "results.sqlite"
    path.write_text("not a database" * 100)
    with pytest.raises(ValueError, match="not a sinai result store"):
        ResultStore(path)
