"""ART's ``BlackBoxClassifier`` pointed at a sinai endpoint: the snippet of docs/serving.md, run as it is
written there, against a loopback server (issue 14 item 6)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from sinai.serving import ServeConfig, ServerThread, add_key, create_app
from sinai.serving.client import sync_client

pytest.importorskip("art", reason="adversarial-robustness-toolbox is the test extra's peer tool")

DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"


def snippet() -> str:
    """The ```python block that follows ``<!-- art-snippet -->`` in docs/serving.md."""
    match = re.search(r"<!-- art-snippet -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/serving.md lost its <!-- art-snippet --> block"
    return match.group(1)


@pytest.mark.parametrize("output", ["probs", "labels"])
def test_art_snippet_attacks_the_endpoint_and_is_charged(mnist_models, tmp_path, monkeypatch, output):
    path = tmp_path / "keys.json"
    key = add_key(path, "art", budget=100_000)
    config = ServeConfig(defense="RND:std=0.05", output=output, api_keys=str(path))
    server = ServerThread(create_app(config, model=copy.deepcopy(mnist_models["mnist-cnn"]))).start()
    monkeypatch.setenv("SINAI_URL", server.url)
    monkeypatch.setenv("SINAI_API_KEY", key)
    namespace: dict = {"__name__": "art_snippet"}
    try:
        exec(compile(snippet(), str(DOC), "exec"), namespace)
        with sync_client(server.url, api_key=key) as c:
            charged = c.get("/v1/usage").json()["queries"]
    finally:
        if "client" in namespace:
            namespace["client"].close()
        server.stop()
    assert namespace["x_adv"].shape == namespace["x"].shape
    assert 0 <= namespace["accuracy"] <= 1
    assert namespace["sent"] > 10  # HopSkipJump queried the endpoint (more than one pass over 10 images)
    assert charged == namespace["sent"]  # every image ART sent was charged to the key
