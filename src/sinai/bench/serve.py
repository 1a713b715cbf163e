"""``sinai bench serve``: a bounded load test of ``sinai serve`` on loopback, reported as ratios of one run.

N concurrent asyncio clients (raw HTTP/1.1 on asyncio streams, keep-alive, ``TCP_NODELAY``) send ``.npy``
requests of a fixed batch size for T seconds each; a cell reports requests/s, images/s, p50/p99 latency
and errors. The server runs in a subprocess (``sinai serve``; the clients get the bench process) or, for
tests, in a thread. The same run measures the defended model's own forward images/s at batch 64
(target: serving batch-64 requests at concurrency 32 >= 0.7x that; dynamic
batching >= 3x the requests/s of the unbatched server for batch-1 requests at concurrency 32; zero
errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import httpx
import numpy as np
import torch
from torch import nn

from ..serving.client import npy_bytes, sync_client

MAX_REQUESTS_PER_CELL = 200_000  # a bound on top of the time bound


@dataclass(frozen=True)
class LoadRow:
    """One cell of the load test."""

    batching: bool
    concurrency: int
    batch: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    images_per_s: float
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class ServeBench:
    """The cells, the defended model's own forward rate at ``forward_batch``, and the issue's ratios."""

    rows: tuple[LoadRow, ...]
    forward_images_per_s: float
    forward_batch: int

    def cell(self, *, batching: bool, concurrency: int, batch: int) -> LoadRow | None:
        for r in self.rows:
            if (r.batching, r.concurrency, r.batch) == (batching, concurrency, batch):
                return r
        return None

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.rows)

    def ratios(self) -> dict[str, float | None]:
        """``serve_vs_forward``: batch-64 requests at the top concurrency, images/s over the forward's;
        ``batching_gain``: batch-1 requests at the top concurrency, requests/s batched over unbatched."""
        top = max(r.concurrency for r in self.rows)
        big = self.cell(batching=True, concurrency=top, batch=self.forward_batch)
        on = self.cell(batching=True, concurrency=top, batch=1)
        off = self.cell(batching=False, concurrency=top, batch=1)
        return {
            "serve_vs_forward": big.images_per_s / self.forward_images_per_s if big else None,
            "batching_gain": on.requests_per_s / off.requests_per_s
            if on and off and off.requests_per_s
            else None,
        }


# ----------------------------------------------------------------------------------------- clients
class _Connection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a pre-built request in one write
    (no Nagle stall), the response read by Content-Length. Python's HTTP clients cost more per request
    than the server under test; this one costs tens of microseconds."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if not chunked:
            return status, await self.reader.readexactly(length)
        parts = []
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return status, b"".join(parts)
            parts.append(data[:-2])

    def close(self) -> None:
        self.writer.close()


def _raw_request(host: str, port: int, body: bytes, api_key: str | None) -> bytes:
    head = [
        "POST /v1/predict HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/x-npy",
        f"Content-Length: {len(body)}",
    ]
    if api_key:
        head.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _load(
    url: str, body: bytes, batch: int, concurrency: int, seconds: float, api_key: str | None
) -> LoadRow:
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    raw = _raw_request(host, port, body, api_key)
    latencies: list[float] = []
    errors = 0
    connections = [await _Connection.open(host, port) for _ in range(concurrency)]
    try:
        # Warm-up: the model's first forwards, every connection used once.
        await asyncio.gather(*(c.request(raw) for c in connections))
        start = time.perf_counter()
        deadline = start + seconds

        async def worker(conn: _Connection) -> None:
            nonlocal errors
            while time.perf_counter() < deadline and len(latencies) + errors < MAX_REQUESTS_PER_CELL:
                t = time.perf_counter()
                try:
                    status, answer = await conn.request(raw)
                    ok = status == 200 and answer.startswith(b"{")
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
                    conn.close()
                    conn = await _Connection.open(host, port)

        await asyncio.gather(*(worker(c) for c in connections))
        elapsed = time.perf_counter() - start
    finally:
        for c in connections:
            c.close()
    done = len(latencies)
    q = (
        statistics.quantiles(latencies, n=100, method="inclusive")
        if done >= 2
        else [latencies[0] if done else 0.0] * 99
    )
    return LoadRow(
        batching=True, concurrency=concurrency, batch=batch, requests=done, errors=errors, seconds=elapsed,
        requests_per_s=done / elapsed, images_per_s=done * batch / elapsed, p50_ms=1000 * q[49],
        p99_ms=1000 * q[98],
    )  # fmt: skip


def load_test(
    url: str,
    input_shape: Sequence[int],
    *,
    concurrencies: Sequence[int] = (1, 8, 32),
    batches: Sequence[int] = (1, 64),
    seconds: float = 3.0,
    batching: bool = True,
    api_key: str | None = None,
    seed: int = 0,
) -> list[LoadRow]:
    """Load-test the server at ``url``: one cell per (batch, concurrency), ``seconds`` each."""
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        body = npy_bytes(rng.random((batch, *input_shape), dtype=np.float32))
        for concurrency in concurrencies:
            row = asyncio.run(_load(url, body, batch, concurrency, seconds, api_key))
            rows.append(LoadRow(**{**row.__dict__, "batching": batching}))
    return rows


# --------------------------------------------------------------------------------------- servers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with sync_client(url, timeout=2) as c:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {proc.returncode}: {proc.stderr.read()[-2000:]}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if c.get("/healthz").status_code == 200:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not answer /healthz within {timeout:.0f} s")


@contextlib.contextmanager
def subprocess_server(args: Sequence[str], *, timeout: float = 300.0) -> Iterator[str]:
    """``sinai serve ARGS --port P`` in a subprocess on a free loopback port; yields its URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "sinai.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def thread_server(model: nn.Module, defense: str, **config: object) -> Iterator[str]:
    """The app of ``model`` in a thread of this process (tests: no model loading by name)."""
    import copy

    from ..serving import ServeConfig, ServerThread, create_app

    app = create_app(ServeConfig(defense=defense, **config), model=copy.deepcopy(model))
    with ServerThread(app) as server:
        yield server.url


# ------------------------------------------------------------------------------------ the forward
@torch.no_grad()
def forward_rate(
    model: nn.Module, defense: str, *, batch: int = 64, seconds: float = 2.0, seed: int = 0
) -> float:
    """The defended model's own forward images/s at ``batch`` (median of 5 timings of ``seconds``/5)."""
    from ..defenses import protect

    defended = protect(model, defense, seed=None, validate=False)
    try:
        x = torch.rand((batch, *model.input_shape), generator=torch.Generator().manual_seed(seed))
        x = x.to(next(model.parameters()).device)
        for _ in range(3):
            defended(x)
        rates = []
        for _ in range(5):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 5:
                defended(x)
                n += 1
            rates.append(n * batch / (time.perf_counter() - start))
        return statistics.median(rates)
    finally:
        defended.remove()


def bench_serve(
    *,
    model: nn.Module,
    model_name: str,
    defense: str = "none",
    seconds: float = 3.0,
    concurrencies: Sequence[int] = (1, 8, 32),
    batches: Sequence[int] = (1, 64),
    server: str = "subprocess",
    server_args: Sequence[str] = (),
    batch_wait_ms: float = 2.0,
    max_batch_forward: int = 256,
) -> ServeBench:
    """The whole load test: every cell on the batched server, the batch-1 cells on the same server with
    batching off, and the forward rate of ``model`` with ``defense`` at batch ``max(batches)`` (the faster
    of a timing before and one after the load).

    ``server="subprocess"`` starts ``sinai serve --model model_name`` (plus ``server_args``) in a
    subprocess; ``"thread"`` serves ``model`` itself from a thread of this process.
    """
    if server not in ("subprocess", "thread"):
        raise ValueError(f"server must be 'subprocess' or 'thread', got {server!r}")
    if not concurrencies or not batches or min(concurrencies) < 1 or min(batches) < 1:
        raise ValueError("concurrencies and batches must be non-empty lists of positive integers")
    if not 0 < seconds <= 600:
        raise ValueError(f"seconds must be in (0, 600] per cell, got {seconds}")
    shape = tuple(model.input_shape)
    big = max(batches)
    rows: list[LoadRow] = []
    # The forward is timed before and after the load (the faster kept: a conservative ratio when the
    # machine's load changes during the run).
    forward = forward_rate(model, defense, batch=big, seconds=max(1.0, seconds))
    for batching in (True, False):
        cells = batches if batching else (1,)
        settings = {
            "batching": batching, "batch_wait_ms": batch_wait_ms, "max_batch_forward": max_batch_forward,
            "max_batch": max(256, big),
        }  # fmt: skip
        if server == "thread":
            ctx = thread_server(model, defense, **settings)
        else:
            args = ["--model", model_name, "--defense", defense, "--batch-wait-ms", str(batch_wait_ms),
                    "--max-batch-forward", str(max_batch_forward), "--max-batch", str(settings["max_batch"]),
                    "--batching" if batching else "--no-batching", *server_args]  # fmt: skip
            ctx = subprocess_server(args)
        with ctx as url:
            rows += load_test(
                url, shape, concurrencies=concurrencies, batches=cells, seconds=seconds, batching=batching
            )
    forward = max(forward, forward_rate(model, defense, batch=big, seconds=max(1.0, seconds)))
    return ServeBench(rows=tuple(rows), forward_images_per_s=forward, forward_batch=big)


def serve_table(result: ServeBench) -> str:
    """The cells as a Markdown table, then the ratios with their targets."""
    lines = [
        "| batching | concurrency | batch | requests | errors | requests/s | images/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.rows:
        lines.append(
            f"| {'on' if r.batching else 'off'} | {r.concurrency} | {r.batch} | {r.requests} | {r.errors} | "
            f"{r.requests_per_s:.1f} | {r.images_per_s:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} |"
        )
    ratios = result.ratios()
    top = max(r.concurrency for r in result.rows)

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    lines += [
        "",
        f"defended model's own forward: {result.forward_images_per_s:.0f} images/s "
        f"at batch {result.forward_batch}",
        f"batch-{result.forward_batch} requests at concurrency {top} / own forward: "
        f"{show(ratios['serve_vs_forward'])} (target >= 0.7x)",
        f"batch-1 requests at concurrency {top}, batching on / off: {show(ratios['batching_gain'])} "
        "(target >= 3x)",
        f"errors: {result.errors} (target 0)",
    ]
    return "\n".join(lines)
