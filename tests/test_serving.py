"""``sinai serve``: the HTTP API on a real uvicorn server on a free loopback port (issue 14 items 1-5)."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import random

import httpx
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sinai.cli import cli
from sinai.serving import ServeConfig, ServerThread, add_key, create_app, read_keys
from sinai.serving.client import async_client, sync_client

MAX_BATCH = 64
MAX_BYTES = 4 * 2**20


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


NPY = {"content-type": "application/x-npy"}


@pytest.fixture(scope="module")
def cnn(mnist_models):
    return mnist_models["mnist-cnn"]


@pytest.fixture(scope="module")
def batch(mnist_images) -> tuple[np.ndarray, np.ndarray]:
    x, y = mnist_images
    return x[:MAX_BATCH].numpy().astype(np.float32), y[:MAX_BATCH].numpy()


def start(model, **kw) -> ServerThread:
    """A server of a private copy of ``model`` (two apps never hook the same module)."""
    kw = {"defense": "RND:std=0.05", "max_batch": MAX_BATCH, "max_bytes": MAX_BYTES, **kw}
    return ServerThread(create_app(ServeConfig(**kw), model=copy.deepcopy(model))).start()


@pytest.fixture(scope="module")
def server(cnn):
    s = start(cnn)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with sync_client(server.url) as c:
        yield c


def clean_labels(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


def assert_error(r: httpx.Response, *statuses: int) -> str:
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    assert "\n" not in body["error"]
    return body["error"]


# --------------------------------------------------------------------------------------- the API
def test_predict_json_and_npy_batch_of_64(client, cnn, batch):
    x, _ = batch
    expected = clean_labels(cnn, x)
    for r in (
        client.post("/v1/predict", json={"images": x.tolist()}),
        client.post("/v1/predict", content=npy(x), headers=NPY),
    ):
        assert r.status_code == 200, r.text
        body = r.json()
        probs = np.array(body["probs"])
        assert body["output"] == "probs" and body["queries"] == len(x)
        assert probs.shape == (len(x), 10)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
        assert (probs.argmax(1) == expected).mean() >= 0.9  # small noise keeps the clean decisions


def test_info_health_and_metrics(client, cnn):
    info = client.get("/v1/info").json()
    assert info["input_shape"] == list(cnn.input_shape) and info["num_classes"] == 10
    assert info["value_range"] == [0.0, 1.0] and info["output"] == "probs" and info["max_batch"] == MAX_BATCH
    assert "defense" not in json.dumps(info).lower() and "std" not in info  # never the defense's parameters
    assert client.get("/healthz").json() == {"status": "ok"}
    client.post("/v1/predict", json={"images": [[[[2.0] * 28] * 28]]})  # one rejection at least
    text = client.get("/metrics").text
    for metric in (
        "sinai_requests_total",
        "sinai_images_total",
        "sinai_request_seconds_bucket",
        "sinai_rejections_total",
        "sinai_forward_images_bucket",
    ):
        assert metric in text
    assert 'sinai_rejections_total{reason="invalid"}' in text


def test_noise_is_fresh_per_request_and_per_image(cnn, batch):
    x = np.repeat(batch[0][:1], 4, axis=0)  # the same image four times in one batch
    s = start(cnn, output="logits")
    try:
        with sync_client(s.url) as c:
            a = np.array(c.post("/v1/predict", content=npy(x), headers=NPY).json()["logits"])
            b = np.array(c.post("/v1/predict", content=npy(x), headers=NPY).json()["logits"])
    finally:
        s.stop()
    assert len({tuple(row) for row in a}) == 4  # identical images, independent noise
    assert not np.allclose(a, b)  # the same request twice: different noise
    clean = cnn(torch.from_numpy(x[:1])).detach().numpy()
    assert np.abs(a - clean).max() < 5  # noise of std 0.05 at the input moves the logits a little


def test_output_policies(cnn, batch):
    x, _ = batch
    expected = clean_labels(cnn, x[:8])
    for output, check in (
        ("labels", lambda b: (np.array(b["labels"]) == expected).mean() >= 0.75 and "probs" not in b),
        (
            "topk",
            lambda b: (
                np.array(b["topk"]["classes"]).shape == (8, 3)
                and np.all(np.diff(np.array(b["topk"]["probs"]), axis=1) <= 0)
            ),
        ),
    ):
        s = start(cnn, output=output, topk=3)
        try:
            with sync_client(s.url) as c:
                body = c.post("/v1/predict", json={"images": x[:8].tolist()}).json()
                assert c.get("/v1/info").json()["output"] == output
        finally:
            s.stop()
        assert body["output"] == output and check(body), body


# -------------------------------------------------------------------------------- bad requests
def _bad_requests(x: np.ndarray) -> list[tuple[str, dict, int]]:
    """(what, request kwargs, expected status) for every kind of bad request of issue 14 item 4."""
    one = x[:1]
    nan, inf = one.copy(), one.copy()
    nan[0, 0, 0, 0], inf[0, 0, 0, 0] = np.nan, np.inf
    good = npy(one)
    huge = bytearray(good)
    header = good[10 : 10 + int.from_bytes(good[8:10], "little")].replace(
        b"(1, 1, 28, 28)", b"(99999999, 1, 28, 28)"
    )
    huge = (
        good[:8]
        + len(header).to_bytes(2, "little")
        + header
        + good[10 + int.from_bytes(good[8:10], "little") :]
    )
    return [
        ("wrong shape json", {"json": {"images": np.zeros((1, 1, 27, 28)).tolist()}}, 422),
        ("wrong shape npy", {"content": npy(np.zeros((1, 1, 27, 28), np.float32)), "headers": NPY}, 422),
        ("no batch dim", {"content": npy(one[0]), "headers": NPY}, 422),
        ("empty batch", {"content": npy(np.zeros((0, 1, 28, 28), np.float32)), "headers": NPY}, 422),
        ("int dtype npy", {"content": npy((one * 255).astype(np.uint8)), "headers": NPY}, 422),
        ("complex dtype npy", {"content": npy(one.astype(np.complex64)), "headers": NPY}, 422),
        ("string values json", {"json": {"images": [[[["a"] * 28] * 28]]}}, 422),
        ("booleans json", {"json": {"images": [[[[True] * 28] * 28]]}}, 422),
        ("nulls json", {"json": {"images": [[[[None] * 28] * 28]]}}, 422),
        (
            "NaN json",
            {
                "content": json.dumps({"images": nan.tolist()}).encode(),
                "headers": {"content-type": "application/json"},
            },
            422,
        ),
        ("NaN npy", {"content": npy(nan), "headers": NPY}, 422),
        ("inf npy", {"content": npy(inf), "headers": NPY}, 422),
        ("above range", {"content": npy(one + 1.5), "headers": NPY}, 422),
        ("below range", {"json": {"images": (one - 1).tolist()}}, 422),
        (
            "batch over max-batch",
            {"content": npy(np.zeros((MAX_BATCH + 1, 1, 28, 28), np.float32)), "headers": NPY},
            413,
        ),
        ("body over max-bytes", {"content": b"0" * (MAX_BYTES + 1), "headers": NPY}, 413),
        (
            "malformed json",
            {"content": b'{"images": [[[', "headers": {"content-type": "application/json"}},
            400,
        ),
        ("json not an object", {"json": [1, 2, 3]}, 400),
        ("json extra keys", {"json": {"images": one.tolist(), "output": "logits"}}, 400),
        ("ragged json", {"json": {"images": [[[[0.5] * 28] * 27 + [[0.5] * 3]]]}}, 422),
        (
            "deep json",
            {
                "content": b'{"images": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                "headers": {"content-type": "application/json"},
            },
            400,
        ),
        ("malformed npy", {"content": b"\x93NUMPY\x01\x00garbage", "headers": NPY}, 400),
        ("not npy", {"content": b"hello world", "headers": NPY}, 400),
        ("truncated npy", {"content": good[:-7], "headers": NPY}, 400),
        ("npy header lies about shape", {"content": huge, "headers": NPY}, 400),
        ("pickled object npy", {"content": npy(np.array([{"a": 1}], dtype=object)), "headers": NPY}, 422),
        ("unsupported content type", {"content": good, "headers": {"content-type": "text/plain"}}, 415),
    ]


def test_every_bad_request_is_a_one_line_4xx(client, batch):
    for what, kwargs, status in _bad_requests(batch[0]):
        r = client.post("/v1/predict", **kwargs)
        message = assert_error(r, status)
        assert len(message) < 300, (what, message)
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/predict"), 405)


def _mutations(rng: random.Random, x: np.ndarray) -> list[dict]:
    """Random malformed requests: corrupted npy and JSON bodies, random shapes, values and headers."""
    good_npy, good_json = npy(x[:2]), json.dumps({"images": x[:2].tolist()}).encode()
    types = [
        "application/x-npy",
        "application/json",
        "application/octet-stream",
        "text/plain",
        "",
        "image/png",
    ]
    out = []
    for _ in range(300):
        kind = rng.randrange(6)
        body = bytearray(good_npy if rng.random() < 0.6 else good_json)
        if kind == 0:  # flip random bytes
            for _ in range(rng.randint(1, 20)):
                body[rng.randrange(len(body))] = rng.randrange(256)
        elif kind == 1:  # truncate
            body = body[: rng.randrange(len(body))]
        elif kind == 2:  # random bytes
            body = bytearray(rng.randbytes(rng.randrange(2000)))
        elif kind == 3:  # random shape, dtype and values
            shape = tuple(rng.choice([0, 1, 2, 3, 27, 28, 29]) for _ in range(rng.randint(0, 5)))
            while np.prod(shape) > 100_000:  # keep the client cheap: bodies of at most a few hundred kB
                shape = shape[1:]
            dtype = rng.choice([np.float16, np.float32, np.float64, np.int32, np.uint8, np.bool_])
            arr = (np.random.default_rng(rng.randrange(2**32)).standard_normal(shape) * 3).astype(dtype)
            body = bytearray(npy(arr))
        elif kind == 4:  # a good header, a body of random floats outside [0, 1] or non-finite
            arr = x[:2].copy()
            arr.flat[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf, -0.5, 1.5, 1e30])
            body = bytearray(
                npy(arr) if rng.random() < 0.5 else json.dumps({"images": arr.tolist()}).encode()
            )
        else:  # JSON of the wrong structure
            body = bytearray(
                json.dumps(
                    rng.choice([{}, [], {"images": 1}, {"images": "x"}, {"img": []}, 3, None])
                ).encode()
            )
        if kind in (0, 1) and bytes(body) in (good_npy, good_json):
            continue
        ctype = (
            rng.choice(types)
            if rng.random() < 0.2
            else ("application/json" if body[:1] in b"{[" else "application/x-npy")
        )
        out.append({"content": bytes(body), "headers": {"content-type": ctype}})
    return out


def test_fuzz_hundreds_of_malformed_requests_then_a_good_one(client, cnn, batch):
    x, _ = batch
    statuses = {}
    requests = _mutations(random.Random(14), x)
    assert len(requests) >= 250
    for kwargs in requests:
        r = client.post("/v1/predict", **kwargs)
        if r.status_code == 200:  # a byte flip inside the pixel data can leave a valid request
            assert len(r.json()["probs"]) == 2
            continue
        assert_error(r, *range(400, 500))
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert sum(statuses.values()) >= 200 and set(statuses) >= {400, 415, 422}
    r = client.post("/v1/predict", content=npy(x), headers=NPY)
    assert r.status_code == 200
    probs = np.array(r.json()["probs"])
    assert (probs.argmax(1) == clean_labels(cnn, x)).mean() >= 0.9
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------- API keys
def test_api_keys_budget_rate_and_own_usage(cnn, batch, tmp_path):
    path = tmp_path / "keys.json"
    alice = add_key(path, "alice", budget=20)
    bob = add_key(path, "bob", rate=4.0, burst=4)
    text = path.read_text()
    assert alice not in text and bob not in text and len(read_keys(path)) == 2  # stored hashed
    x = batch[0][:4]
    s = start(cnn, api_keys=str(path))
    try:
        with sync_client(s.url) as c:
            assert_error(c.post("/v1/predict", content=npy(x), headers=NPY), 401)
            assert_error(
                c.post("/v1/predict", content=npy(x), headers={**NPY, "x-api-key": "sk-sinai-wrong"}), 401
            )
            assert_error(c.get("/v1/info"), 401)
            assert_error(c.get("/v1/usage"), 401)
            a = {"authorization": f"Bearer {alice}"}
            b = {"x-api-key": bob}
            assert c.get("/v1/info", headers=a).json()["auth"] is True
            for _ in range(5):  # 20 queries: alice's whole budget
                assert c.post("/v1/predict", content=npy(x), headers={**NPY, **a}).status_code == 200
            err = assert_error(c.post("/v1/predict", content=npy(x[:1]), headers={**NPY, **a}), 429)
            assert "budget" in err
            usage = c.get("/v1/usage", headers=a).json()
            assert usage["key"] == "alice" and usage["queries"] == 20 and usage["remaining"] == 0
            assert usage["rejected"] == 1 and "bob" not in json.dumps(usage)
            assert c.post("/v1/predict", content=npy(x), headers={**NPY, **b}).status_code == 200  # 4 tokens
            r = c.post("/v1/predict", content=npy(x), headers={**NPY, **b})
            assert_error(r, 429)
            assert int(r.headers["retry-after"]) >= 1
            assert_error(
                c.post("/v1/predict", content=npy(batch[0][:5]), headers={**NPY, **b}), 429
            )  # > burst
            bob_usage = c.get("/v1/usage", headers=b).json()
            assert (
                bob_usage["key"] == "bob"
                and bob_usage["queries"] == 4
                and "alice" not in json.dumps(bob_usage)
            )
            assert c.get("/healthz").status_code == 200  # liveness needs no key
    finally:
        s.stop()


def test_non_loopback_needs_keys_or_insecure(tmp_path):
    with pytest.raises(ValueError, match="non-loopback"):
        ServeConfig(host="0.0.0.0")
    ServeConfig(host="0.0.0.0", insecure=True)
    ServeConfig(host="::1")
    ServeConfig(host="localhost")
    path = tmp_path / "k.json"
    add_key(path, "a")
    assert ServeConfig(host="0.0.0.0", api_keys=str(path)).auth
    with pytest.raises(FileNotFoundError, match="keys add"):
        ServeConfig(api_keys=str(tmp_path / "missing.json"))
    for bad in (
        {"output": "scores"},
        {"max_batch": 0},
        {"batch_wait_ms": -1},
        {"port": 70000},
        {"defense": "XYZ"},
    ):
        with pytest.raises(ValueError):
            ServeConfig(**bad)


def test_cli_serve_refuses_and_keys_commands(tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code != 0 and "non-loopback" in r.output and len(r.output.strip().splitlines()) == 1
    path = str(tmp_path / "keys.json")
    r = runner.invoke(cli, ["serve", "keys", "add", "--file", path, "--name", "carol", "--budget", "7"])
    assert r.exit_code == 0, r.output
    key = r.stdout.strip().splitlines()[0]
    assert key.startswith("sk-sinai-") and key not in open(path).read()
    r = runner.invoke(cli, ["serve", "keys", "list", "--file", path])
    assert "carol" in r.output and "budget=7" in r.output
    r = runner.invoke(cli, ["serve", "keys", "add", "--file", path, "--name", "carol"])
    assert r.exit_code != 0 and "already has" in r.output
    assert runner.invoke(cli, ["serve", "keys", "remove", "--file", path, "--name", "carol"]).exit_code == 0
    assert read_keys(path) == []


# ------------------------------------------------------------------------------- dynamic batching
async def _concurrent(url: str, x: np.ndarray, n: int) -> list[httpx.Response]:
    async with async_client(url) as c:
        return await asyncio.gather(*(c.post("/v1/predict", content=npy(x), headers=NPY) for _ in range(n)))


def _forwards(text: str) -> float:
    line = next(v for v in text.splitlines() if v.startswith("sinai_forwards_total"))
    return float(line.split()[-1])


@pytest.mark.parametrize("batching", [True, False])
def test_dynamic_batching_groups_concurrent_requests(cnn, batch, batching):
    x = batch[0][:1]
    s = start(cnn, batching=batching, batch_wait_ms=20.0, output="logits")
    try:
        responses = asyncio.run(_concurrent(s.url, x, 24))
        forwards = _forwards(httpx.get(s.url + "/metrics").text)
    finally:
        s.stop()
    assert all(r.status_code == 200 for r in responses)
    logits = np.array([r.json()["logits"][0] for r in responses])
    assert len({tuple(v) for v in logits}) == 24  # every request its own noise, batched or not
    if batching:
        assert forwards < 24 / 2  # grouped: far fewer forwards than requests
    else:
        assert forwards == 24


def test_bench_serve_measures_every_cell_without_errors(cnn):
    from sinai.bench.serve import bench_serve, serve_table

    result = bench_serve(
        model=cnn,
        model_name="mnist-cnn",
        defense="RND:std=0.05",
        seconds=0.3,
        concurrencies=(1, 4),
        batches=(1, 8),
        server="thread",
    )
    cells = {(r.batching, r.concurrency, r.batch) for r in result.rows}
    assert cells == {(True, c, b) for c in (1, 4) for b in (1, 8)} | {(False, 1, 1), (False, 4, 1)}
    assert result.errors == 0 and all(r.requests > 0 and r.p99_ms >= r.p50_ms > 0 for r in result.rows)
    ratios = result.ratios()
    assert ratios["serve_vs_forward"] > 0 and ratios["batching_gain"] > 0 and result.forward_batch == 8
    table = serve_table(result)
    assert "target >= 0.7x" in table and "target >= 3x" in table and "errors: 0" in table
