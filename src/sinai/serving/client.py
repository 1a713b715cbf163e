"""HTTP clients for a sinai endpoint (remote targets, ``sinai bench serve``, tests).

httpx writes a request's headers and body in two sends; without ``TCP_NODELAY`` Nagle's algorithm
holds the body until the server acknowledges the headers, which a delayed ACK postpones by ~40 ms: every
request would take 40 ms on loopback. These clients set ``TCP_NODELAY`` (curl does by default).
"""

from __future__ import annotations

import io
import socket

import httpx
import numpy as np

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
NPY_HEADERS = {"content-type": "application/x-npy"}


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def sync_client(base_url: str, *, api_key: str | None = None, timeout: float = 60.0) -> httpx.Client:
    """An ``httpx.Client`` for ``base_url`` with ``TCP_NODELAY`` and the key's header."""
    return httpx.Client(
        base_url=base_url, timeout=timeout, headers=auth_headers(api_key),
        transport=httpx.HTTPTransport(socket_options=NODELAY), trust_env=False,
    )  # fmt: skip


def async_client(
    base_url: str, *, api_key: str | None = None, timeout: float = 60.0, connections: int = 100
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for ``base_url`` with ``TCP_NODELAY`` and the key's header."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        base_url=base_url, timeout=timeout, headers=auth_headers(api_key),
        transport=httpx.AsyncHTTPTransport(socket_options=NODELAY, limits=limits), trust_env=False,
    )  # fmt: skip


def npy_bytes(x: np.ndarray) -> bytes:
    """``x`` as a ``.npy`` body (float32)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()
