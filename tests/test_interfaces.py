"""Interfaces users expect (issue 18 part 5): help on every command and option, ``sinai eval --json``,
quick ``sinai eval`` defaults with the papers' protocol behind ``--paper``, ``bench attacks --json-out``
and the torchattacks-style ``sinai.attack``."""

from __future__ import annotations

import json

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import Counting, images, tiny_cnn
from torch import nn

import sinai
from sinai.cli import cli
from sinai.evaluation.defaults import PAPER, QUICK


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ------------------------------------------------------------------------------------------ help text
def _commands(command: click.Command, path: str = "sinai"):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}")


def test_every_command_and_option_has_help():
    missing = []
    for path, command in _commands(cli):
        if not (command.help or "").strip():
            missing.append(path)
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and not (param.help or "").strip():
                missing.append(f"{path} {'/'.join(param.opts)}")
    assert not missing, f"no help text: {missing}"
    assert len(list(_commands(cli))) > 20  # the walk reached the nested groups


def test_every_eps_option_says_it_is_a_radius_not_a_budget():
    for path, command in _commands(cli):
        for param in command.params:
            if isinstance(param, click.Option) and "--eps" in param.opts:
                assert "radius" in param.help.lower() and "attack budget" not in param.help.lower(), path
    tune_help = run("tune", "--help").output
    assert "pixel units" in tune_help and "not a query budget" in tune_help


# ------------------------------------------------------------------------------------------ sinai eval
def _json_line(result) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, result.stdout  # one object, alone on stdout
    return json.loads(lines[0])


def test_eval_json_is_one_object_that_agrees_with_the_table_and_the_store(cache, tmp_path):
    from sinai.evaluation.store import ResultStore

    args = ["eval", "--model", "mnist-cnn", "--defense", "RND:std=0.05", "--attack", "square"]
    args += [
        "--budget",
        "20,60",
        "--images",
        "12",
        "--passes",
        "2",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    first = run(*args, "--json")
    assert first.exit_code == 0, first.output
    record = _json_line(first)
    assert "|" not in first.stdout  # no Markdown table mixed in
    assert record["model"] == "mnist-cnn" and record["dataset"] == "mnist" and record["images"] == 12
    assert record["defense"] == "RND(input std=0.05)" and record["attack"] == "square"
    assert record["budgets"] == [20, 60] and len(record["clean_accuracy"]["passes"]) == 2
    clean = record["clean_accuracy"]
    assert clean["low"] <= clean["mean"] <= clean["high"]
    with ResultStore(tmp_path / "results.sqlite") as store:
        ((run_id, _, _),) = store.runs()
        results = store.results(run_id)
    rows = record["robust_accuracy"]
    assert [r["budget"] for r in rows] == [20, 60]
    for row in rows:
        robust = sum(r.robust_at(row["budget"]) for r in results)
        assert row["accuracy"] == pytest.approx(100 * robust / len(results))
        assert row["low"] <= row["accuracy"] <= row["high"] and row["n"] == 12
    assert rows[0]["accuracy"] >= rows[1]["accuracy"]  # more queries never make an image more robust
    assert record["queries"]["total"] == sum(r.queries for r in results) <= 12 * 60
    assert "snd" not in record  # SND's metrics are for decision attacks

    table = run(*args)  # resumed from the store: the same numbers as a table
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if line.startswith("| mnist-cnn"))
    for r in rows:
        assert f"{r['accuracy']:.1f} [{r['low']:.1f}, {r['high']:.1f}]" in row
    again = run(*args, "--json")
    assert {k: v for k, v in _json_line(again).items() if k != "seconds"} == {
        k: v for k, v in record.items() if k != "seconds"
    }


def test_eval_json_of_a_decision_attack_carries_the_snd_metrics(cache, tmp_path):
    args = ["eval", "--model", "mnist-cnn", "--attack", "rays", "--eps", "0.3", "--budget", "10,30"]
    args += ["--images", "10", "--passes", "1", "--out", str(tmp_path), "--device", "cpu", "--json"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    record = _json_line(result)
    assert record["attack_kind"] == "decision"
    success = record["snd"]["attack_success"]
    assert [row["budget"] for row in success] == [10, 30] and success[0]["rate"] <= success[1]["rate"]
    assert all(row["low"] <= row["rate"] <= row["high"] for row in success)
    # the attacked images are the correctly classified ones: the others count as not robust
    attacked, robust = success[1]["n"], record["robust_accuracy"][1]["accuracy"]
    assert robust == pytest.approx(attacked * (100 - success[1]["rate"]) / record["images"], abs=1e-3)


def test_eval_defaults_are_the_quick_protocol_and_paper_is_the_papers(cache, tmp_path):
    quick = run("eval", "--model", "mnist-cnn", "--out", str(tmp_path / "q"), "--device", "cpu", "--json")
    assert quick.exit_code == 0, quick.output
    assert _json_line(quick)["images"] == QUICK.images
    assert _json_line(quick)["budgets"] == [int(b) for b in QUICK.budgets.split(",")]
    paper = run("eval", "--model", "mnist-cnn", "--paper", "--out", str(tmp_path / "p"), "--device", "cpu")
    assert paper.exit_code == 0, paper.output
    assert f"{PAPER.images} images" in paper.stderr and "budgets (1000, 10000)" in paper.stderr
    assert QUICK.images * 1000 <= 1e5 < PAPER.images * 10000  # minutes vs hours of queries per attack
    help_text = " ".join(run("eval", "--help").output.split())
    assert "--paper" in help_text and "1000 images" in help_text and "hours on a CPU" in help_text
    clash = run("eval", "--model", "mnist-cnn", "--paper", "--images", "50", "--device", "cpu")
    assert clash.exit_code != 0 and "--paper sets --images 1000" in clash.output
    assert "Traceback" not in clash.output


# ------------------------------------------------------------------------------------------ bench attacks
def test_bench_attacks_json_out_holds_the_printed_rows(cache, tmp_path):
    path = tmp_path / "attacks.json"
    args = ["bench", "attacks", "--attacks", "square,rays", "--images", "10", "--budget", "20"]
    result = run(*args, "--rounds", "1", "--device", "cpu", "--json-out", str(path))
    assert result.exit_code == 0, result.output
    payload = json.loads(path.read_text())
    assert payload["model"] == "mnist-cnn" and payload["images"] == 10 and payload["budget"] == 20
    assert [r["attack"] for r in payload["rows"]] == ["square", "rays"]
    cells = [
        [c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines() if line[:2] == "| "
    ]
    header, printed = cells[0], {c[0]: dict(zip(cells[0], c, strict=True)) for c in cells[1:]}
    assert header[0] == "attack" and "ratio" in header
    for row in payload["rows"]:
        assert row["ratio"] > 0 and row["queries"] > 0
        assert float(printed[row["attack"]]["ratio"]) == pytest.approx(row["ratio"], abs=5e-4)


# ------------------------------------------------------------------------------------------ sinai.attack
@pytest.fixture(scope="module")
def tiny():
    """An untrained CNN and 12 images labelled by it (so every image starts correctly classified)."""
    model = tiny_cnn()
    x = images(12)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_attack_returns_adversarials_queries_and_success_through_the_oracle(tiny):
    model, x, y = tiny
    counting = Counting(model)
    result = sinai.attack("square", counting, x, y, eps=0.3, budget=50, seed=3)
    adversarials, queries, success = result  # unpacks like a tuple
    assert adversarials.shape == x.shape and queries.shape == success.shape == (len(x),)
    assert 0 < int(success.sum()) < len(x), "the check needs broken and unbroken images"
    # Every query went through the Oracle: the clean check (one pass, deterministic model) + counted queries.
    assert counting.seen == len(x) + int(queries.sum())
    assert torch.equal(result.success_at[success], queries[success])  # an image leaves at its success
    assert bool((queries[~success] == 50).all()) and bool((result.success_at[~success] == -1).all())
    distance = (adversarials - x).flatten(1).abs().amax(1)
    assert (
        bool((distance <= 0.3 + 1e-6).all())
        and 0 <= float(adversarials.min()) <= float(adversarials.max()) <= 1
    )
    with torch.no_grad():
        assert bool((model(adversarials).argmax(1)[success] != y[success]).all())
    assert result.robust_accuracy == pytest.approx(1 - success.float().mean().item())
    again = sinai.attack("square", model, x, y, eps=0.3, budget=50, seed=3)
    assert torch.equal(again.queries, queries) and torch.equal(again.adversarials, adversarials)


def test_attack_on_a_defense_gives_the_per_image_results_of_evaluate(tiny):
    model, x, y = tiny
    y = y.clone()
    y[:2] = (y[:2] + 1) % 10  # two images misclassified before any query
    ours = sinai.attack("square", model, x, y, eps=0.3, budget=60, defense="RND:std=0.05", seed=1)
    assert not bool(ours.clean_correct[:2].any()) and bool(ours.success[:2].all())
    assert bool((ours.queries[:2] == 0).all()) and torch.equal(ours.adversarials[:2], x[:2])
    assert 0 < int(ours.success[2:].sum()) < len(x) - 2, "the check needs broken and unbroken images"
    config = sinai.EvalConfig(
        attack="square", defense=sinai.parse_defense("RND:std=0.05"), threat=sinai.ThreatModel("linf", 0.3),
        budgets=(60,), seed=1, shard_size=len(x), passes=1,
    )  # fmt: skip
    theirs = sinai.evaluate(model, x, y, config, progress=False).results
    assert [r.queries for r in theirs] == ours.queries.tolist()
    assert [not r.robust_at(60) for r in theirs] == ours.success.tolist()
    assert [r.clean_correct for r in theirs] == ours.clean_correct.tolist()
    correct = ours.clean_correct.tolist()
    assert [r.success_at or -1 for r, ok in zip(theirs, correct, strict=True) if ok] == ours.success_at[
        ours.clean_correct
    ].tolist()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # defense removed


def test_attack_takes_a_protected_model_or_a_plain_module(tiny):
    model, x, y = tiny
    with sinai.protect(model, "RND:std=0.05", seed=0) as defended:
        result = sinai.attack("signhunter", defended, x, y, eps=0.1, budget=30)
        assert result.queries.shape == (len(x),) and len(defended.sites) == 1  # left protected
        with pytest.raises(ValueError, match="already protected"):
            sinai.attack("square", defended, x, y, eps=0.1, defense="RND:std=0.05")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(256, 10), nn.BatchNorm1d(10))  # no num_classes attribute
    plain(x)  # BatchNorm statistics of these images
    plain.eval()
    with torch.no_grad():
        labels = plain(x).argmax(1)
    found = sinai.attack("square", plain, x, labels, eps=0.2, budget=30)
    assert bool(found.success.any())
    with torch.no_grad():
        assert bool((plain(found.adversarials).argmax(1)[found.success] != labels[found.success]).all())
    plain.train()  # attacked in eval mode (as torchattacks), handed back in the caller's mode
    in_train_mode = sinai.attack("square", plain, x, labels, eps=0.2, budget=30)
    assert torch.equal(in_train_mode.adversarials, found.adversarials)
    assert all(m.training for m in plain.modules())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "squares"}, "unknown attack 'squares'"),
        ({"eps": 2.0}, "larger than the pixel range"),
        ({"budget": 0}, "budget must be an integer >= 1"),
        ({"p_init": 0.1, "bogus": 1}, "square has no parameter 'bogus'"),
        ({"y": torch.zeros(3, dtype=torch.long)}, "one integer label per image"),
        ({"defense": "RND:std=-1"}, "std must be"),
        ({"name": "rays", "norm": "l2"}, "rays is defined for linf only"),
    ],
)
def test_attack_rejects_bad_input_with_one_line(tiny, kwargs, message):
    model, x, y = tiny
    call = {"name": "square", "y": y, "eps": 0.1, "budget": 10} | kwargs
    with pytest.raises(ValueError, match=message) as err:
        sinai.attack(call.pop("name"), model, x, call.pop("y"), **call)
    assert "\n" not in str(err.value)
