"""``sinai serve --replicas``: the same FastAPI app under Ray Serve, two replicas on a local Ray instance
bound to 127.0.0.1 (issue 14 item 1)."""

from __future__ import annotations

import copy
import socket

import numpy as np
import pytest
import torch

from sinai.serving import ServeConfig
from sinai.serving.client import NPY_HEADERS, npy_bytes, sync_client
from sinai.serving.replicas import build_app, deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve():
    import ray
    from ray import serve

    ray.init(
        address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
        object_store_memory=80 * 2**20, log_to_driver=False, configure_logging=False,
    )  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield serve, f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.mark.slow  # starting and stopping Ray took ~3 min on the loaded 2-core machine (--runslow)
def test_two_replicas_answer_with_fresh_noise(ray_serve, mnist_models, mnist_images):
    serve, url = ray_serve
    cnn = mnist_models["mnist-cnn"]
    config = ServeConfig(defense="RND:std=0.05", output="logits", max_batch=64)
    serve.run(
        deployment(config, replicas=2, num_cpus=0.5, model=copy.deepcopy(cnn)), name="sinai", route_prefix="/"
    )
    states = serve.status().applications["sinai"].deployments["sinai"].replica_states
    assert states.get("RUNNING") == 2, states
    x = mnist_images[0][:32].numpy().astype(np.float32)
    with torch.no_grad():
        clean = cnn(torch.from_numpy(x)).argmax(1).numpy()
    with sync_client(url) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/v1/info").json()["input_shape"] == [1, 28, 28]
        answers = []
        for _ in range(6):  # several requests: Ray's router spreads them over both replicas
            r = c.post("/v1/predict", content=npy_bytes(x), headers=NPY_HEADERS)
            assert r.status_code == 200, r.text
            answers.append(np.array(r.json()["logits"]))
        bad = c.post("/v1/predict", json={"images": [[[[2.0] * 28] * 27]]})
    assert bad.status_code == 422 and set(bad.json()) == {"error"}
    for logits in answers:
        assert logits.shape == (32, 10) and (logits.argmax(1) == clean).mean() >= 0.9
    assert all(not np.allclose(answers[0], a) for a in answers[1:])  # fresh noise on every request
    serve.delete("sinai")


def test_build_app_reads_serve_run_arguments():
    app = build_app({"model": "mnist-cnn", "defense": "RND:std=0.05", "replicas": "3", "max_batch": "32"})
    assert app is not None
    with pytest.raises(ValueError, match="unknown sinai serve options"):
        build_app({"modle": "mnist-cnn"})
    with pytest.raises(ValueError, match="replicas must be"):
        deployment(ServeConfig(), replicas=0)
