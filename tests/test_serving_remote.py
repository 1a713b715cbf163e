"""Remote targets: the Oracle and the attacks against a live sinai endpoint (issue 14 item 6)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sinai.attacks import QueryRules, ThreatModel, make_attack
from sinai.attacks.oracle import Oracle
from sinai.cli import cli
from sinai.serving import ServeConfig, ServerThread, add_key, create_app
from sinai.serving.remote import RemoteError, RemoteModel


@pytest.fixture(scope="module")
def cnn(mnist_models):
    return mnist_models["mnist-cnn"]


def start(model, **kw) -> ServerThread:
    return ServerThread(
        create_app(ServeConfig(defense="RND:std=0.05", **kw), model=copy.deepcopy(model))
    ).start()


@pytest.fixture(scope="module")
def scores_server(cnn):
    s = start(cnn)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def labels_server(cnn):
    s = start(cnn, output="labels")
    yield s
    s.stop()


def test_remote_model_reads_info_and_answers_like_the_model(scores_server, cnn, mnist_images):
    remote = RemoteModel(scores_server.url)
    assert remote.input_shape == cnn.input_shape and remote.num_classes == 10 and not remote.labels_only
    x = mnist_images[0].repeat(3, 1, 1, 1)  # 300 images, more than max_batch=256: two requests
    with torch.no_grad():
        out = remote(x)
        clean = cnn(x).argmax(1)
    assert out.shape == (300, 10) and remote.sent == 300 and remote.requests == 3  # info + 2 predicts
    np.testing.assert_allclose(out.exp().sum(1).numpy(), 1.0, atol=1e-4)  # log-probabilities
    assert (out.argmax(1) == clean).float().mean() >= 0.9
    assert remote.usage()["queries"] >= 300
    with pytest.raises(RemoteError, match="not gradients"):
        remote(x[:1].clone().requires_grad_())


def test_oracle_ledger_equals_what_the_server_charged(cnn, mnist_images):
    path_server = start(cnn)  # a fresh server: its count starts at zero
    try:
        remote = RemoteModel(path_server.url)
        x, y = mnist_images[0][:8], mnist_images[1][:8]
        oracle = Oracle(
            remote, x, y, threat=ThreatModel("linf", 0.2), rules=QueryRules(budget=60, votes=9), batch_size=64
        )
        make_attack("square")(oracle, seed=0)
        charged = remote.usage()["queries"]
    finally:
        path_server.stop()
    ledger = int(oracle.queries.sum() + oracle.vote_passes.sum())
    assert oracle.queries.sum() > 0
    assert charged == ledger == remote.sent


def test_eval_target_reports_an_equal_ledger(scores_server, tmp_path):
    r = CliRunner().invoke(
        cli,
        [
            "eval",
            "--target",
            scores_server.url,
            "--attack",
            "square",
            "--images",
            "10",
            "--budget",
            "50",
            "--confirm",
            "11",
            "--out",
            str(tmp_path),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    line = next(v for v in r.output.splitlines() if v.startswith("remote ledger"))
    assert line.endswith("(equal)") and "vote passes" in line


def test_label_only_endpoint_allows_decision_attacks_only(labels_server, tmp_path):
    runner = CliRunner()
    r = runner.invoke(
        cli,
        [
            "eval",
            "--target",
            labels_server.url,
            "--attack",
            "square",
            "--images",
            "10",
            "--budget",
            "20",
            "--out",
            str(tmp_path / "a"),
        ],
    )
    assert r.exit_code != 0 and "labels only" in r.output and "rays" in r.output
    r = runner.invoke(
        cli,
        [
            "eval",
            "--target",
            labels_server.url,
            "--attack",
            "pgd",
            "--images",
            "10",
            "--budget",
            "20",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert r.exit_code != 0 and "remote target" in r.output
    r = runner.invoke(
        cli,
        [
            "eval",
            "--target",
            labels_server.url,
            "--attack",
            "rays",
            "--images",
            "10",
            "--budget",
            "40",
            "--confirm",
            "5",
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "(equal)" in r.output


def test_target_with_api_keys(cnn, tmp_path):
    path = tmp_path / "keys.json"
    key = add_key(path, "eve", budget=5000)
    s = start(cnn, api_keys=str(path))
    try:
        runner = CliRunner()
        r = runner.invoke(cli, ["eval", "--target", s.url, "--images", "10", "--out", str(tmp_path / "o")])
        assert r.exit_code != 0 and "401" in r.output and len(r.output.strip().splitlines()) == 1
        r = runner.invoke(
            cli,
            [
                "eval",
                "--target",
                s.url,
                "--api-key",
                key,
                "--attack",
                "square",
                "--images",
                "10",
                "--budget",
                "30",
                "--confirm",
                "5",
                "--out",
                str(tmp_path / "p"),
            ],
        )
        assert r.exit_code == 0, r.output
        assert "(equal)" in r.output
        r = runner.invoke(
            cli, ["eval", "--target", s.url, "--api-key", key, "--defense", "RND", "--images", "10"]
        )
        assert r.exit_code != 0 and "own defense" in r.output
    finally:
        s.stop()
