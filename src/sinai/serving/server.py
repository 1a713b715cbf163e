"""Running the app on uvicorn: in the foreground (``sinai serve``) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from .config import ServeConfig


def serve(config: ServeConfig, app: FastAPI) -> None:
    """Serve ``app`` on ``config.host:config.port`` until interrupted (Ctrl-C, SIGTERM)."""
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level, access_log=False)


class ServerThread:
    """``app`` on uvicorn in a background thread, on a free loopback port; a context manager.

    ``url`` is ``http://127.0.0.1:PORT``; leaving the context stops the server and joins the thread.
    """

    def __init__(
        self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
    ) -> None:
        self.app, self.host, self.port, self.timeout = app, host, port, timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
        # without it every response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="sinai-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self.timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.timeout)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
