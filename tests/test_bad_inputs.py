"""Bad inputs, command line and Python API (issue 18 part 2): each is refused where it enters, with one
line that names the input and says what is valid, and never a traceback; ctrl-C is one line and exit
code 130; a real bug is still a traceback.

The command-line cases run in-process through click's CliRunner on the short-recipe embedded CNN
(trained once for this module, seconds); the ctrl-C cases run ``sinai`` in a real subprocess and send it
a real SIGINT.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import images, tiny_cnn, tiny_vit

from sinai.attacks import make_attack
from sinai.attacks.oracle import Oracle, QueryRules
from sinai.attacks.threat import ThreatModel
from sinai.checks import check_count
from sinai.cli import INTERRUPTED, cli
from sinai.defenses import AAASpec, Defense, NoiseSpec, parse_defense, preset, protect
from sinai.evaluation.clean import clean_accuracy
from sinai.evaluation.config import EvalConfig
from sinai.evaluation.protocol import evaluate
from sinai.evaluation.store import ResultStore

TESTS = Path(__file__).resolve().parent


def one_line_error(args: list[str], *fragments: str) -> str:
    """Run ``sinai ARGS``; assert a non-zero exit, no traceback and exactly one ``Error:`` line holding
    every fragment (the input's name and what is valid). Returns that line."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"not a clean exit: {result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def one_line_value_error(call, *fragments: str) -> str:
    """``call()`` raises a ``ValueError`` whose message is one line holding every fragment."""
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


EVAL = ["eval", "--model", "mnist-cnn", "--images", "10", "--device", "cpu"]


# ------------------------------------------------------------------------------ the cases, CLI
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        # silently taken for something else before
        (["--defense", "SINAI:attn.std=0.3"], ("attn", "has no attn sites", "it has:")),
        (["--defense", "SINAI:relu.std=0.5,relu.ratio=0"], ("relu.ratio=0", "(0, 1]")),
        (["--defense", "RND:std=0.05,std=0.5"], ("input.std twice", "give each field once")),
        (["--defense", "RND:std=0"], ("adds nothing", "'none'")),
        (["--defense", "input.std=0"], ("adds nothing", "std > 0")),
        (["--defense", "RND:selection=threshold"], ("input.selection", "ratio < 1")),
        (["--defense", "AAA:variant=sine,alpha=0.5"], ("alpha", "linear")),
        (["--defense", "AAA:T=2,temperature=3"], ("temperature twice",)),
        (["--votes", "0"], ("votes", ">= 1", "odd")),
        (["--votes", "4"], ("votes", "odd")),
        (["--votes", "-3"], ("votes", ">= 1")),
        # tracebacks or riddles before
        (["--batch-size", "0"], ("batch_size", ">= 1")),
        (["--attack", "square", "--attack-args", "p_init=abc"], ("p_init", "number", "'abc'")),
        (["--attack", "square", "--attack-args", "p_init=0.1,p_init=0.2"], ("p_init", "twice")),
        (["--attack", "square", "--attack-args", "max_redraws=1.5"], ("max_redraws", "integer")),
        (["--attack", "pgd", "--attack-args", "random_start=1"], ("random_start", "true or false")),
        (["--attack", "square", "--attack-args", "p_init=nan"], ("p_init", "finite number")),
        (["--attack", "square", "--attack-args", "p_inti=0.1"], ("p_inti", "p_init")),
        # and a few more a user can type
        (["--images", "0"], ("--images", ">= 1")),
        (["--seed", "abc"], ("--seed", "abc")),
        (["--seed", str(2**40)], ("seed", "[0, 2**32)")),
        (["--budget", "0"], ("budgets", "positive")),
        (["--eps", "nan", "--attack", "square"], ("eps", "positive")),
        (["--defense", "RND:std=inf"], ("std", "finite")),
        (["--defense", "bogus"], ("unknown defense 'bogus'", "RND")),
        (["--vote-alpha", "2"], ("vote_alpha", "(0, 1)")),
    ],
)
def test_eval_refuses_a_bad_input_in_one_line(cache, tmp_path, args, fragments):
    one_line_error([*EVAL, "--out", str(tmp_path / "out"), *args], *fragments)


def test_a_read_only_or_blocked_out_folder_is_one_line(cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    one_line_error([*EVAL, "--out", str(blocker)], "--out", "a-file")
    one_line_error([*EVAL, "--out", str(blocker / "sub")], "--out", "is a file")
    if os.geteuid() != 0:  # root may write into a read-only folder: nothing to refuse
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            one_line_error([*EVAL, "--out", str(locked / "run")], "--out", "read-only")
        finally:
            locked.chmod(0o755)
    # the store refuses a folder it cannot make, or a file it cannot open, in one line too
    one_line_value_error(lambda: ResultStore(blocker / "sub" / "results.sqlite"), "cannot create", "sub")
    (tmp_path / "odd" / "results.sqlite").mkdir(parents=True)  # a folder where the store should be
    one_line_error([*EVAL, "--out", str(tmp_path / "odd")], "cannot open", "results.sqlite")


def test_garbage_in_results_sqlite_names_the_file(cache, tmp_path):
    out = tmp_path / "run"
    ok = CliRunner().invoke(cli, [*EVAL, "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    path = out / "results.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("UPDATE clean SET accuracy = 'abc'")
    one_line_error([*EVAL, "--out", str(out)], str(path), "table clean", "accuracy", "'abc'")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE clean SET accuracy = 0.5")
        db.execute("UPDATE runs SET settings = '{not json'")
    one_line_error(["report", str(out)], str(path), "settings")
    path.write_bytes(b"this is not a database" * 100)
    one_line_error([*EVAL, "--out", str(out)], str(path), "not a sinai result store")


def test_bench_defenses_refuses_an_unknown_defense_before_any_work(cache):
    one_line_error(["bench", "defenses", "--defenses", "XYZ"], "--defenses", "unknown defense 'XYZ'", "SINAI")
    one_line_error(["bench", "defenses", "--models", "mnist-cnn@0"], "--models", ">= 1")
    one_line_error(
        ["bench", "defenses", "--defenses", "SINAI-Attn", "--models", "mnist-cnn@8", "--rounds", "1"],
        "SINAI-Attn", "mnist-cnn",
    )  # fmt: skip


def test_calibrate_refuses_defenses_it_cannot_calibrate(cache, tmp_path):
    calibrate = ["calibrate", "--model", "mnist-cnn", "--images", "20", "--out", str(tmp_path)]
    one_line_error([*calibrate, "--defense", "XYZ"], "--defense", "unknown defense 'XYZ'")
    one_line_error([*calibrate, "--defense", "SINAI-Attn"], "none of the defenses SINAI-Attn", "sinai sites")
    one_line_error([*calibrate, "--defense", "SINAI-Attn:std=1"], "attn", "this model has")


def test_the_defense_calibrate_prints_is_one_eval_accepts(cache, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["calibrate", "--model", "mnist-cnn", "--defense", "SINAI", "--images", "30", "--passes", "1",
         "--drop", "0.05", "--tolerance", "0.04", "--out", str(tmp_path / "cal"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("| SINAI "))
    text = row.strip("| ").split("|")[-1].strip()
    assert text.startswith("SINAI:relu.std=")
    evaluated = CliRunner().invoke(cli, [*EVAL, "--defense", text, "--out", str(tmp_path / "eval")])
    assert evaluated.exit_code == 0, evaluated.output
    std = float(parse_defense(text).specs["relu"].std)
    assert f"SINAI(relu std={std:g}" in evaluated.stdout  # the calibrated defense, not another one


# ------------------------------------------------------------------------------ the catch-all hides no bug
@pytest.fixture
def bug_commands():
    """Two commands on the real ``sinai`` group: a bug (a builtin's ValueError) and an input check."""

    @click.command("bug-range")
    def bug_range() -> None:
        list(range(0, 3, 0))  # a ValueError no one raised on purpose: a bug

    @click.command("bug-key")
    def bug_key() -> None:
        _ = {}["missing"]

    @click.command("input-check")
    def input_check() -> None:
        check_count("widgets", 0, 1, "widgets per gizmo")  # sinai's own check: bad input

    for command in (bug_range, bug_key, input_check):
        cli.add_command(command)
    yield
    for name in ("bug-range", "bug-key", "input-check"):
        cli.commands.pop(name)


def test_a_bug_is_still_a_traceback_and_bad_input_is_one_line(bug_commands):
    with pytest.raises(ValueError, match="range"):
        CliRunner().invoke(cli, ["bug-range"], catch_exceptions=False)
    with pytest.raises(KeyError):
        CliRunner().invoke(cli, ["bug-key"], catch_exceptions=False)
    one_line_error(["input-check"], "widgets", ">= 1")


# ------------------------------------------------------------------------------ ctrl-C: one line, exit 130
def _interrupt(args: list[str], marker: str, cache: Path, settle: float = 1.0) -> tuple[int, str]:
    """Run ``sinai ARGS`` in a subprocess (the module's recipes and cache), send it SIGINT once its
    stderr shows ``marker`` (plus ``settle`` seconds), and return its exit code and stderr."""
    script = (
        "import sys, pytest; sys.path.insert(0, sys.argv[1]); "
        "from conftest import SHORT_RECIPES, use_recipes; use_recipes(pytest.MonkeyPatch(), SHORT_RECIPES); "
        "from sinai.cli import main; main(sys.argv[2:])"
    )
    env = dict(os.environ, SINAI_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(TESTS), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stderr.read1(4096), b"")))
    reader.start()
    deadline = time.monotonic() + 120
    try:
        while marker.encode() not in b"".join(chunks):
            assert proc.poll() is None, b"".join(chunks).decode(errors="replace")
            assert time.monotonic() < deadline, "the command never reached the point to interrupt"
            time.sleep(0.05)
        time.sleep(settle)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
    return code, b"".join(chunks).decode(errors="replace")


def _lines(stderr: str) -> list[str]:
    """What a terminal shows: carriage-return redraws (progress bars) collapsed, empty lines dropped."""
    return [line.split("\r")[-1] for line in stderr.splitlines() if line.split("\r")[-1].strip()]


@pytest.mark.parametrize(
    ("command", "marker"),
    [
        (["tune", "--model", "mnist-cnn", "--trials", "40", "--images", "100", "--screen", "100:400",
          "--passes", "1"], "tune:"),
        (["eval", "--model", "mnist-cnn", "--images", "100", "--attack", "square", "--budget", "10000"],
         "square:"),
    ],
    ids=["tune", "eval"],
)  # fmt: skip
def test_ctrl_c_is_one_line_and_exit_130(cache, tmp_path, command, marker):
    code, stderr = _interrupt([*command, "--out", str(tmp_path / "out")], marker, cache)
    assert code == INTERRUPTED == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and "Aborted" not in stderr, stderr
    said = [line for line in _lines(stderr) if "interrupted" in line]
    assert len(said) == 1 and said[0].startswith("interrupted (ctrl-C)"), stderr
    assert not any(line.startswith("[W ") for line in _lines(stderr)), stderr  # no Optuna trial warning


# ------------------------------------------------------------------------------ the Python API
@pytest.fixture(scope="module")
def cnn():
    return tiny_cnn()


def _oracle(model, x, **kwargs):
    y = torch.zeros(len(x), dtype=torch.long)
    rules = QueryRules(budget=10, votes=0)
    return Oracle(model, x, y, threat=ThreatModel("linf", 0.1), rules=rules, **kwargs)


def _with(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x[0, 0, 0, 0] = value
    return x


@pytest.mark.parametrize(
    ("call", "fragments"),
    [
        (lambda m: protect(m, 5), ("defense must be a Defense", "RND:std=0.05", "5")),
        (lambda m: protect("mnist-cnn", "RND"), ("model must be a torch nn.Module", "str")),
        (lambda m: protect(m, "RND", seed="abc"), ("seed", "integer >= 0", "'abc'")),
        (lambda m: protect(m, "RND", seed=-1), ("seed", "[0, 2**64)")),
        (lambda m: protect(m, "RND", seed=1.5), ("seed", "integer")),
        (lambda m: protect(m, "SINAI:attn.std=0.3"), ("attn", "no attn sites", "relu")),
        (lambda m: protect(m, preset("SINAI", attn=0.3)), ("attn", "no attn sites")),
        (lambda m: protect(m, "RND", seed=0)(_with(images(2), float("nan"))), ("NaN", "finite", "[0, 1]")),
        (lambda m: protect(m, "RND", seed=0)(_with(images(2), float("inf"))), ("[0, 1]", "inf")),
        (lambda m: protect(m, "RND", seed=0)(images(2).double()), ("float64", "x.float()")),
        (lambda m: _oracle(m, _with(images(2), float("nan"))), ("NaN", "[0, 1]")),
        (lambda m: _oracle(m, _with(images(2), -float("inf"))), ("[0, 1]", "-inf")),
        (lambda m: _oracle(m, images(2).double()), ("float64", "x.float()")),
        (lambda m: _oracle(m, images(2), batch_size=0), ("batch_size", ">= 1")),
        (lambda m: clean_accuracy(m, images(2), torch.zeros(2), batch_size=0), ("batch_size", ">= 1")),
        (lambda m: clean_accuracy(m, images(2).double(), torch.zeros(2)), ("float64",)),
        (
            lambda m: evaluate(m, images(2), torch.zeros(2), EvalConfig(), batch_size=0),
            ("batch_size", ">= 1"),
        ),
    ],
)
def test_the_api_refuses_a_bad_input_where_it_enters(cnn, call, fragments):
    one_line_value_error(lambda: call(cnn), *fragments)


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda: parse_defense("RND:std=0.05,input.std=0.5"), ("input.std twice",)),
        (lambda: parse_defense("mc=2,input.std=1,mc=3"), ("mc twice",)),
        (lambda: parse_defense("SINAI:gelu.ratio=1,gelu.selection=threshold"), ("gelu.selection", "ratio=1")),
        (lambda: parse_defense("MFDV:std=0"), ("adds nothing", "'none'")),
        (lambda: parse_defense(5), ("defense text must be a string",)),
        (lambda: preset("SINAI", relu=NoiseSpec(std=0.5, ratio=0.0)), ("relu.ratio=0",)),
        (lambda: preset("RND", input={"sdt": 0.1}), ("'sdt'", "std")),
        (lambda: preset("RND", input="0.1"), ("'input' kind", "number")),
        (lambda: AAASpec(variant="sine", alpha=0.5), ("alpha", "linear")),
        (lambda: Defense({"input": AAASpec()}), ("must be a NoiseSpec",)),
        (lambda: make_attack("square", p_init="abc"), ("square p_init", "number", "'abc'")),
        (lambda: make_attack("pgd", steps=2.5), ("pgd steps", "integer")),
        (lambda: EvalConfig(votes=2), ("votes", "odd")),
        (lambda: EvalConfig(votes=0), ("votes", ">= 1")),
        (lambda: EvalConfig(vote_alpha=2.0), ("vote_alpha", "(0, 1)")),
        (lambda: EvalConfig(budgets=(1.5,)), ("budgets", "whole numbers")),
        (lambda: EvalConfig(defense="RND"), ("defense must be a Defense", "parse_defense")),
        (lambda: EvalConfig(lucky="yes"), ("lucky", "True or False")),
    ],
)
def test_specs_and_configs_refuse_bad_values(make, fragments):
    one_line_value_error(make, *fragments)


def test_a_damaged_store_names_the_file_through_the_api(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultStore(path) as store:
        run_id = store.run_id({"attack": "none"})
        store.add_clean(run_id, [0.5])
    with sqlite3.connect(path) as db:
        db.execute("UPDATE runs SET settings = '[1, 2]'")
    with ResultStore(path) as store:
        one_line_value_error(store.runs, str(path), "table runs", "settings")


def test_fields_the_model_cannot_use_are_errors_but_sinai_still_fits_each_model():
    vit, cnn = tiny_vit(), tiny_cnn()
    assert {s.kind for s in protect(cnn, "SINAI", seed=0).sites} == {"relu"}  # no field set: fits the CNN
    assert {s.kind for s in protect(vit, "SINAI:gelu.std=0.1", seed=0).sites} == {"attn", "gelu"}
    one_line_value_error(lambda: protect(vit, "SINAI:relu.std=0.3", seed=0), "relu", "no relu sites")
    one_line_value_error(lambda: parse_defense("SINAI:relu.std=0.3").for_model(vit), "relu")
    for text in ("RND:std=0.03", "SINAI:attn.std=1.0,gelu.std=0.1,gelu.ratio=0.7", "AAA:variant=sine,tau=4"):
        defense = parse_defense(text)
        assert parse_defense(defense.to_text()) == defense  # what to_text writes reads back the same
