"""Stateful detection (Blacklight) in ``sinai serve``: attacks flagged, benign images not, the policies,
the memory bound (issue 14 item 7)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from click.testing import CliRunner

from sinai.attacks import QueryRules, ThreatModel, make_attack
from sinai.attacks.oracle import Oracle
from sinai.cli import cli
from sinai.models.data import mnist
from sinai.serving import ServeConfig, ServerThread, add_key, create_app
from sinai.serving.client import NPY_HEADERS, npy_bytes, sync_client
from sinai.serving.detect import BYTES_PER_HASH, Blacklight, Detector
from sinai.serving.remote import RemoteModel


@pytest.fixture(scope="module")
def cnn(mnist_models):
    return mnist_models["mnist-cnn"]


@pytest.fixture(scope="module")
def test_split() -> np.ndarray:
    data = mnist("test")
    return data.load(list(range(len(data.labels)))).numpy().astype(np.float32)


def start(model, **kw) -> ServerThread:
    kw = {"defense": "none", "detect": "blacklight", **kw}
    return ServerThread(create_app(ServeConfig(**kw), model=copy.deepcopy(model))).start()


def post(client, x: np.ndarray):
    return client.post("/v1/predict", content=npy_bytes(x), headers=NPY_HEADERS)


def test_square_attack_is_flagged_within_a_few_queries(cnn, mnist_images):
    s = start(cnn)
    try:
        remote = RemoteModel(s.url)
        x, y = mnist_images[0][:1], mnist_images[1][:1]
        oracle = Oracle(remote, x, y, threat=ThreatModel("linf", 0.1), rules=QueryRules(budget=30, votes=0))
        make_attack("square")(oracle, seed=0)
        detection = remote.usage()["detection"]
        metrics = sync_client(s.url).get("/metrics").text
    finally:
        s.stop()
    assert detection["flagged"] >= 1 and detection["first_flagged_query"] is not None
    assert detection["first_flagged_query"] <= 10  # the clean check, the stripes init, then a square
    assert detection["inspected"] == remote.sent  # every image charged was inspected
    assert 'sinai_detections_total{policy="flag"}' in metrics


def test_distinct_test_images_are_not_flagged(cnn, test_split):
    s = start(cnn, max_batch=256)
    try:
        with sync_client(s.url) as c:
            flagged = [post(c, test_split[i : i + 250]).json()["flagged"] for i in range(0, 500, 250)]
            usage = c.get("/v1/usage").json()
    finally:
        s.stop()
    assert flagged == [0, 0]
    assert usage["detection"] == {
        "policy": "flag", "inspected": 500, "flagged": 0, "first_flagged_query": None, "banned": False,
    }  # fmt: skip


def test_policies_flag_reject_ban_per_key(cnn, test_split, tmp_path):
    path = tmp_path / "keys.json"
    alice, bob = add_key(path, "alice"), add_key(path, "bob")
    x = test_split[:1]
    for policy in ("flag", "reject", "ban"):
        s = start(cnn, api_keys=str(path), detect_policy=policy)
        try:
            with sync_client(s.url, api_key=alice) as a, sync_client(s.url, api_key=bob) as b:
                first = post(a, x)
                assert first.status_code == 200 and first.json()["flagged"] == 0
                assert post(b, x).status_code == 200  # another key's history is its own
                again = post(a, x)  # the same image again: an exact duplicate
                usage = a.get("/v1/usage").json()
                later = post(a, test_split[5:6])  # a different image afterwards
                metrics = a.get("/metrics").text
                assert b.get("/v1/usage").json()["detection"]["flagged"] == 0
        finally:
            s.stop()
        assert usage["queries"] == 2  # a rejected query is still charged
        assert usage["detection"]["flagged"] == 1 and usage["detection"]["first_flagged_query"] == 2
        if policy == "flag":
            assert again.status_code == 200 and again.json()["flagged"] == 1
            assert again.headers["x-sinai-flagged"] == "1"
            assert later.status_code == 200
            assert 'sinai_detected_requests_total{action="flagged"} 1.0' in metrics
        else:
            assert again.status_code == 403 and set(again.json()) == {"error"}
            assert "stateful detection" in again.json()["error"] and usage["rejected"] == 1
        if policy == "reject":
            assert later.status_code == 200 and not usage["detection"]["banned"]
            assert 'sinai_rejections_total{reason="detected"} 1.0' in metrics
        if policy == "ban":
            assert usage["detection"]["banned"]
            assert later.status_code == 403 and "banned" in later.json()["error"]
            assert 'sinai_rejections_total{reason="banned"} 1.0' in metrics


def test_a_repeated_blank_image_is_flagged():
    blank = np.zeros((2, 1, 28, 28), dtype=np.float32)  # one distinct window: fewer hashes than match
    verdict = Detector(Blacklight()).inspect("a", blank)
    assert verdict.matches == (0, 1) and verdict.flagged == 1


def test_memory_is_bounded_per_client_and_in_clients(test_split):
    params = Blacklight(history=5, clients=2)
    det = Detector(params)
    det.inspect("a", test_split[:20])
    record = det.clients["a"]
    assert record.remembered == 5 == det.remembered
    assert len(record.table) <= 5 * params.hashes  # forgotten queries leave no hashes behind
    assert sum(len(ids) for ids in record.table.values()) == 5 * params.hashes
    assert det.inspect("a", test_split[19:20]).flagged == 1  # still remembered
    assert det.inspect("a", test_split[0:1]).flagged == 0  # forgotten: the oldest went first
    det.inspect("b", test_split[:3])
    det.inspect("c", test_split[:3])  # a third client: the least recently seen one ("a") is forgotten
    assert set(det.clients) == {"b", "c"} and det.remembered == 6
    assert params.memory_bound == 2 * 5 * params.hashes * BYTES_PER_HASH


def test_bad_detection_settings_are_one_line_errors(cnn):
    with pytest.raises(ValueError, match="detector must be one of blacklight"):
        ServeConfig(detect="lightblack")
    with pytest.raises(ValueError, match="not key=value"):
        ServeConfig(detect="blacklight:size=3")
    with pytest.raises(ValueError, match="match 60 is more than the 50 hashes"):
        Blacklight.parse("blacklight:hashes=50,match=60")
    with pytest.raises(ValueError, match="detect_policy must be one of flag, reject, ban"):
        ServeConfig(detect="blacklight", detect_policy="shrug")
    assert ServeConfig(detect="none").detect is None
    assert ServeConfig(detect="blacklight:window=30").detect.window == 30
    r = CliRunner().invoke(cli, ["serve", "--detect", "blacklight:window=x"])
    assert r.exit_code != 0 and "window must be an integer" in r.output
