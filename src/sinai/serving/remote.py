"""A sinai endpoint as a model: ``RemoteModel(url)`` is an ``nn.Module`` whose forward is an HTTP call.

The Oracle and every query attack run against it unchanged: the Oracle
counts its queries, the server charges the key, and the two ledgers agree because every image the
module forwards is one image the server answers. The endpoint's output policy decides which attacks can
run: probabilities, logits and top-k feed score-based attacks, labels only the decision-based ones.
Probabilities are returned as log-probabilities (the logits up to a per-image constant: the same label
and the same margins); top-k spreads the remaining mass evenly over the other classes.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import torch
from torch import nn

from .client import NPY_HEADERS, npy_bytes, sync_client

SCORE_OUTPUTS = ("probs", "logits", "topk")


class RemoteError(ValueError):
    """The endpoint refused a request or could not be reached (one line, with the server's error)."""


class RemoteModel(nn.Module):
    """The model behind ``url`` (``http://HOST:PORT``), read from its ``GET /v1/info``.

    ``api_key``: sent as ``Authorization: Bearer``. ``retries``: how often a rate-limited request (429 with
    ``Retry-After``) is retried after the wait the server asks for. ``sent`` counts the images the
    server answered (what it charged), ``requests`` the HTTP requests.
    """

    randomized = True  # the defense is the server's and unknown here: decide successes by the vote

    def __init__(
        self, url: str, *, api_key: str | None = None, timeout: float = 120.0, retries: int = 20
    ) -> None:
        super().__init__()
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"target must be an http(s):// URL such as http://127.0.0.1:8000, got {url!r}")
        self.url = url.rstrip("/")
        self.name = self.url
        self.retries = int(retries)
        self.sent = 0
        self.requests = 0
        self._client = sync_client(self.url, api_key=api_key, timeout=timeout)
        info = self._get("/v1/info")
        try:
            self.input_shape = tuple(int(v) for v in info["input_shape"])
            self.num_classes = int(info["num_classes"])
            self.output = str(info["output"])
            self.max_batch = int(info["max_batch"])
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"{self.url}/v1/info is not a sinai endpoint's info: {info!r}") from None
        if len(self.input_shape) != 3 or self.output not in (*SCORE_OUTPUTS, "labels"):
            raise RemoteError(f"{self.url}/v1/info describes an input or output sinai cannot use: {info!r}")
        # The Oracle and evaluate() find the device from the parameters: an empty one on the CPU.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def labels_only(self) -> bool:
        """Whether the endpoint answers labels only (decision-based attacks only)."""
        return self.output == "labels"

    def usage(self) -> dict[str, object]:
        """The key's usage as the server counts it (``GET /v1/usage``)."""
        return self._get("/v1/usage")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RemoteError(
                f"{self.url} answers queries, not gradients: use a score- or decision-based attack "
                "(white-box attacks need the model's weights)"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"images have shape {tuple(x.shape)}, the endpoint takes (B, {self.input_shape})"
            )
        array = x.detach().to("cpu", torch.float32).numpy()
        parts = [self._predict(array[i : i + self.max_batch]) for i in range(0, len(array), self.max_batch)]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(out).to(x.device)

    # --------------------------------------------------------------------------------------- HTTP
    def _predict(self, x: np.ndarray) -> np.ndarray:
        body = self._send("POST", "/v1/predict", content=npy_bytes(x), headers=NPY_HEADERS)
        if body.get("queries") != len(x):
            raise RemoteError(f"{self.url} charged {body.get('queries')} queries for {len(x)} images")
        self.sent += len(x)
        return self._scores(body, len(x))

    def _scores(self, body: dict, n: int) -> np.ndarray:
        k = self.num_classes
        if self.output == "logits":
            return np.asarray(body["logits"], dtype=np.float32).reshape(n, k)
        if self.output == "probs":
            probs = np.asarray(body["probs"], dtype=np.float64).reshape(n, k)
            return np.log(np.maximum(probs, 1e-300)).astype(np.float32)
        if self.output == "labels":
            labels = np.asarray(body["labels"], dtype=np.int64).reshape(n)
            scores = np.zeros((n, k), dtype=np.float32)
            scores[np.arange(n), labels] = 1.0
            return scores
        classes = np.asarray(body["topk"]["classes"], dtype=np.int64).reshape(n, -1)
        probs = np.asarray(body["topk"]["probs"], dtype=np.float64).reshape(n, -1)
        rest = np.clip(1.0 - probs.sum(1, keepdims=True), 0.0, 1.0) / max(k - classes.shape[1], 1)
        full = np.broadcast_to(rest, (n, k)).copy()  # every other class: an even share of the rest
        np.put_along_axis(full, classes, probs, axis=1)
        return np.log(np.maximum(full, 1e-300)).astype(np.float32)

    def _get(self, path: str) -> dict:
        return self._send("GET", path)

    def _send(self, method: str, path: str, **kwargs: object) -> dict:
        for _ in range(self.retries + 1):
            try:
                r = self._client.request(method, path, **kwargs)
            except httpx.HTTPError as err:
                raise RemoteError(f"cannot reach {self.url}{path}: {err}") from None
            self.requests += 1
            if r.status_code == 429 and r.headers.get("retry-after", "").isdigit():
                time.sleep(min(float(r.headers["retry-after"]), 60.0))  # rate limit: wait as told
                continue
            break
        try:
            body = r.json()
        except (json.JSONDecodeError, ValueError):
            body = None
        if r.status_code != 200:
            message = body.get("error") if isinstance(body, dict) else r.text[:200]
            raise RemoteError(f"{self.url}{path} answered {r.status_code}: {message}")
        if not isinstance(body, dict):
            raise RemoteError(f"{self.url}{path} did not answer a JSON object")
        return body

    def close(self) -> None:
        self._client.close()

    def extra_repr(self) -> str:
        return f"url={self.url}, output={self.output}, input_shape={self.input_shape}"


def check_remote_attack(model: RemoteModel, attacker: object | None) -> None:
    """Refuse, in one line, an attack that cannot run against ``model``'s endpoint."""
    if attacker is None:
        return
    kind, name = getattr(attacker, "kind", ""), getattr(attacker, "name", "the attack")
    if kind not in ("score", "decision"):
        raise ValueError(
            f"{name} is a {kind} attack: it needs the model's weights or gradients, which a remote target "
            "does not give; use a score- or decision-based attack against --target"
        )
    if kind == "score" and model.labels_only:
        raise ValueError(
            f"{model.url} answers labels only (--output labels): {name} needs scores; use a decision-based "
            "attack (rays, signflip, hsja, boundary, signopt, geoda)"
        )


def dataset_for(input_shape: tuple[int, ...], num_classes: int) -> str:
    """The dataset a remote model's input fits: mnist (1x28x28), cifar10 (3x32x32, 10 classes), imagenet."""
    if tuple(input_shape) == (1, 28, 28):
        return "mnist"
    if tuple(input_shape) == (3, 32, 32) and num_classes == 10:
        return "cifar10"
    return "imagenet"


def remote_ledger(results: object, sent: int, charged: int | None) -> str:
    """One line: counted queries + vote passes + other uncounted passes = images sent, vs server's count."""
    counted = sum(r.queries for r in results)
    votes = sum(r.vote_passes for r in results)
    other = sent - counted - votes
    line = (
        f"remote ledger: {counted} counted queries + {votes} vote passes + {other} other uncounted passes "
        f"(clean accuracy, clean check, confirmation) = {sent} images sent"
    )
    if charged is None:
        return line + "; the server's count is unknown"
    verdict = "equal" if charged == sent else f"DIFFERENT by {charged - sent}"
    return line + f"; the server charged {charged} ({verdict})"


__all__ = [
    "RemoteError",
    "RemoteModel",
    "check_remote_attack",
    "dataset_for",
    "load_remote_and_images",
    "remote_ledger",
]


def load_remote_and_images(
    url: str, api_key: str | None, source: object, images: int, seed: int, *, defense: object = None
) -> object:
    """The endpoint at ``url`` as a :class:`RemoteModel` and ``images`` seeded class-covering images of the
    dataset its input fits (``source.data`` / ``source.data_root`` when given): a ``Loaded``."""
    from ..cli.options import Loaded
    from ..models.data import load_dataset, select_images

    if defense is not None and getattr(defense, "specs", None):
        raise ValueError(
            f"--defense {defense.describe()} with --target: the endpoint applies its own defense (set it "
            "with `sinai serve --defense`); drop --defense"
        )
    model = RemoteModel(url, api_key=api_key)
    data = source.data or dataset_for(model.input_shape, model.num_classes)
    dataset = load_dataset(data, root=source.data_root, image_size=model.input_shape[-1])
    if tuple(dataset.input_shape) != model.input_shape:
        raise ValueError(
            f"{dataset.name} images have shape {dataset.input_shape}, but {url} takes {model.input_shape}; "
            "pick the endpoint's dataset with --data"
        )
    chosen = select_images(dataset.labels, images, seed, dataset.num_classes)
    return Loaded(model, data, dataset, chosen, dataset.load(chosen), dataset.labels[chosen])
