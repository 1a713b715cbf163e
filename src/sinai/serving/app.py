"""The FastAPI app of ``sinai serve``: ``create_app(config)``.

``POST /v1/predict`` runs validation -> key, budget and rate -> dynamic batcher -> the defended model
(noise from OS entropy on every forward, independent for every image of a batch) and answers what the
output policy allows plus the queries charged. ``GET /v1/info`` tells a client the input it must send
and the output it gets (never the defense), ``GET /v1/usage`` a key's own usage, ``GET /healthz``
liveness, ``GET /metrics`` Prometheus counters. Every error is a JSON object ``{"error": "one line"}``;
a bad request is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from ..defenses import protect
from .batcher import Batcher
from .codec import BadRequest, check_batch, decode_body
from .config import ServeConfig
from .detect import Detector, Verdict
from .keys import KeyEntry, KeyRing, KeyUsage, Refused

log = logging.getLogger("sinai.serving")

API_VERSION = 1
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Predictor:
    """The model side: ``protect(model, defense, seed=None)`` and the output policy, in the model thread.

    Before every forward the noise generator is reseeded from OS entropy (``reseed(None)``), so no two
    forwards share a stream and nothing an attacker sends can replay the noise.
    """

    def __init__(self, model: nn.Module, config: ServeConfig) -> None:
        self.device = next(model.parameters()).device
        self.defended = protect(model, config.defense, seed=None, validate=False)
        if getattr(self.defended, "_needs_thresholds", False):
            self.defended.calibrate_thresholds(_calibration_images(config, model).to(self.device))
        self.output, self.topk = config.output, min(config.topk, int(model.num_classes))

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.defended.reseed(None)
        logits = self.defended(torch.from_numpy(x).to(self.device)).float()
        if self.output == "logits":
            return {"logits": logits.cpu().numpy()}
        if self.output == "labels":
            return {"labels": logits.argmax(1).cpu().numpy()}
        probs = logits.softmax(1)
        if self.output == "probs":
            return {"probs": probs.cpu().numpy()}
        values, classes = probs.topk(self.topk, dim=1)
        return {"classes": classes.cpu().numpy(), "probs": values.cpu().numpy()}


def _calibration_images(config: ServeConfig, model: nn.Module) -> torch.Tensor:
    """256 images of the model's dataset, for a defense whose thresholds are calibrated once."""
    from ..models.data import load_dataset, sample
    from ..models.zoo import default_dataset

    dataset = load_dataset(default_dataset(config.model, num_classes=model.num_classes), root=None)
    return sample(dataset, min(256, len(dataset.labels)), seed=0)[0]


class Metrics:
    """The Prometheus metrics of one app (its own registry, so several apps can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sinai_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.images = Counter("sinai_images", "Images answered by /v1/predict (queries charged)", registry=r)
        self.latency = Histogram(
            "sinai_request_seconds", "Latency of /v1/predict", buckets=LATENCY_BUCKETS, registry=r
        )
        self.rejections = Counter(
            "sinai_rejections", "Rejected predict requests by reason", ["reason"], registry=r
        )
        self.forwards = Counter("sinai_forwards", "Forward passes of the defended model", registry=r)
        self.forward_images = Histogram(
            "sinai_forward_images", "Images per forward (dynamic batching)", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue = Gauge("sinai_queue_requests", "Requests waiting for a forward", registry=r)
        self.detections = Counter(
            "sinai_detections", "Images flagged by stateful detection", ["policy"], registry=r
        )
        self.detected_requests = Counter(
            "sinai_detected_requests", "Requests with a flagged image, by action", ["action"], registry=r
        )
        self.remembered = Gauge(
            "sinai_detector_remembered_queries", "Query fingerprints the detector holds", registry=r
        )
        self.tracked = Gauge("sinai_detector_clients", "Clients (keys) the detector tracks", registry=r)

    def forward(self, requests: int, images: int) -> None:
        self.forwards.inc()
        self.forward_images.observe(images)


@dataclass
class ServerState:
    config: ServeConfig
    model: nn.Module
    predictor: Predictor
    batcher: Batcher
    keys: KeyRing | None
    anonymous: KeyUsage
    metrics: Metrics
    detector: Detector | None = None
    detect_executor: ThreadPoolExecutor | None = None

    def authenticate(self, request: Request) -> KeyUsage:
        """The caller's usage record; 401 without a valid key when the server has keys."""
        if self.keys is None:
            return self.anonymous
        usage = self.keys.lookup(_presented_key(request))
        if usage is None:
            raise BadRequest(
                401, "missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            )
        return usage

    def client(self, request: Request, usage: KeyUsage) -> str:
        """Who stateful detection tracks: the key's name, or the client's address without keys."""
        if self.keys is not None:
            return f"key:{usage.entry.name}"
        return f"addr:{request.client.host if request.client else 'unknown'}"

    async def inspect(self, client: str, x: np.ndarray) -> Verdict:
        """The detector's verdict on ``x``, computed in its own thread (one at a time, in order)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.detect_executor, self.detector.inspect, client, x)

    def info(self) -> dict[str, object]:
        cfg = self.config
        return {
            "api_version": API_VERSION,
            "input_shape": list(self.model.input_shape),
            "value_range": [0.0, 1.0],
            "dtype": "float32",
            "num_classes": int(self.model.num_classes),
            "output": cfg.output,
            **({"topk": self.predictor.topk} if cfg.output == "topk" else {}),
            "max_batch": cfg.max_batch,
            "max_bytes": cfg.max_bytes,
            "formats": ["application/json", "application/x-npy"],
            "auth": cfg.auth,
        }


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    extra = dict(headers or {})
    if status == 401:
        extra.setdefault("WWW-Authenticate", "Bearer")
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=extra)


_REASONS = {400: "malformed", 401: "auth", 413: "too_large", 415: "unsupported", 422: "invalid"}


class Detected(Exception):
    """A request refused by stateful detection (403): ``reason`` is ``detected`` or ``banned``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(400, f"malformed Content-Length {declared!r}") from None
        if size > limit:
            raise BadRequest(413, f"the body of {size} bytes is over this server's --max-bytes {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the body is over this server's --max-bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ServeConfig, *, model: nn.Module | None = None) -> FastAPI:
    """The app serving ``config`` (``model``: an already loaded classifier instead of ``config.model``)."""
    if not isinstance(config, ServeConfig):
        raise TypeError(f"config must be a ServeConfig, got {config!r}")
    if model is None:
        from ..models.zoo import load_model

        model = load_model(
            config.model, checkpoint=config.checkpoint, weights=config.weights,
            num_classes=config.num_classes, device=config.device, cache_dir=config.cache_dir,
        )  # fmt: skip
    if getattr(model, "input_shape", None) is None or not getattr(model, "num_classes", None):
        raise ValueError("the model needs input_shape and num_classes: wrap it in sinai's ImageClassifier")
    model.eval()
    metrics = Metrics()
    predictor = Predictor(model, config)
    state = ServerState(
        config=config,
        model=model,
        predictor=predictor,
        batcher=Batcher(
            predictor,
            max_images=config.max_batch_forward,
            wait_ms=config.batch_wait_ms,
            enabled=config.batching,
            on_forward=metrics.forward,
        ),  # fmt: skip
        keys=KeyRing.from_file(config.api_keys, max_batch=config.max_batch) if config.api_keys else None,
        anonymous=KeyUsage(entry=KeyEntry(name="anonymous", sha256="0" * 64), capacity=math.inf),
        metrics=metrics,
    )
    metrics.queue.set_function(lambda: state.batcher.queued)
    if config.detect is not None:
        state.detector = Detector(config.detect, policy=config.detect_policy)
        state.detect_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinai-detect")
        metrics.remembered.set_function(lambda: state.detector.remembered)
        metrics.tracked.set_function(lambda: len(state.detector.clients))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher.start()
        yield
        await state.batcher.stop()
        if state.detect_executor is not None:
            state.detect_executor.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="sinai", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sinai = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.requests.labels(
            request.url.path if exc.status_code != 404 else "other", exc.status_code
        ).inc()
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, f"invalid request: {exc.errors()[:1]}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal server error ({type(exc).__name__})")

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        detector, verdict = state.detector, None
        try:
            with state.batcher.arriving():
                usage = state.authenticate(request)
                client = state.client(request, usage) if detector is not None else ""
                if detector is not None and detector.is_banned(client):
                    raise Detected("banned", "this client is banned: an earlier query was flagged as part of "
                                   "a query-based attack (stateful detection)")  # fmt: skip
                body = await _read_body(request, config.max_bytes)
                x = check_batch(decode_body(body, request.headers.get("content-type")), model.input_shape,
                                max_batch=config.max_batch)  # fmt: skip
                usage.admit(len(x))
                if detector is not None:
                    verdict = await state.inspect(client, x)
                    if verdict.flagged:
                        metrics.detections.labels(detector.policy).inc(verdict.flagged)
                        action = {"flag": "flagged", "reject": "rejected", "ban": "banned"}[detector.policy]
                        metrics.detected_requests.labels(action).inc()
                        if detector.policy != "flag":
                            raise Detected(
                                "detected",
                                f"query rejected: {verdict.flagged} of {len(x)} images match an earlier "
                                "query of this client (stateful detection); the images were charged"
                                + ("; this client is now banned" if verdict.banned else ""),
                            )
        except Detected as err:
            usage.rejected += 1
            metrics.rejections.labels(err.reason).inc()
            metrics.requests.labels("/v1/predict", 403).inc()
            return _error(403, err.message)
        except BadRequest as err:
            metrics.rejections.labels(_REASONS.get(err.status, "invalid")).inc()
            metrics.requests.labels("/v1/predict", err.status).inc()
            return _error(err.status, err.message)
        except Refused as err:
            metrics.rejections.labels("rate" if err.retry_after else "budget").inc()
            metrics.requests.labels("/v1/predict", err.status).inc()
            headers = {"Retry-After": str(err.retry_after)} if err.retry_after else None
            return _error(err.status, err.message, headers)
        out = await state.batcher.submit(x)
        answer: dict[str, object] = {"output": config.output, "queries": len(x), "used": usage.queries}
        headers = None
        if verdict is not None:
            answer["flagged"] = verdict.flagged
            headers = {"X-Sinai-Flagged": str(verdict.flagged)}
        if config.output == "topk":
            answer["topk"] = {"classes": out["classes"].tolist(), "probs": out["probs"].tolist()}
        else:
            answer.update({k: v.tolist() for k, v in out.items()})
        metrics.images.inc(len(x))
        metrics.requests.labels("/v1/predict", 200).inc()
        metrics.latency.observe(time.perf_counter() - start)
        return JSONResponse(answer, headers=headers)

    @app.get("/v1/info")
    async def info(request: Request) -> Response:
        try:
            state.authenticate(request)
        except BadRequest as err:
            metrics.requests.labels("/v1/info", err.status).inc()
            return _error(err.status, err.message)
        metrics.requests.labels("/v1/info", 200).inc()
        return JSONResponse(state.info())

    @app.get("/v1/usage")
    async def usage(request: Request) -> Response:
        try:
            record = state.authenticate(request)
        except BadRequest as err:
            metrics.requests.labels("/v1/usage", err.status).inc()
            return _error(err.status, err.message)
        metrics.requests.labels("/v1/usage", 200).inc()
        answer = record.to_dict()
        if state.detector is not None:
            answer["detection"] = state.detector.usage(state.client(request, record))
        return JSONResponse(answer)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
