"""Dynamic batching: concurrent requests grouped into one forward of the defended model.

One asyncio task owns the queue; the model runs in one dedicated thread (a ``DefendedModel`` is not
thread-safe, and one forward at a time uses every core). When a request arrives the task takes every
request already queued and, while the batch holds fewer than ``max_images`` images and some request
is still arriving (its body being read or checked: :meth:`arriving`), waits up to ``wait_ms`` for it; a
lone request is forwarded at once. While a forward runs new requests queue up and form the next batch. With
``enabled=False`` every request is its own forward (the baseline ``sinai bench serve`` compares with).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future


class Batcher:
    """Groups submitted batches into forwards of ``forward(x) -> dict of arrays with B rows``."""

    def __init__(
        self,
        forward: Callable[[np.ndarray], dict[str, np.ndarray]],
        *,
        max_images: int,
        wait_ms: float,
        enabled: bool = True,
        on_forward: Callable[[int, int], None] | None = None,
    ) -> None:
        self.forward = forward
        self.max_images = int(max_images)
        self.wait = float(wait_ms) / 1000.0
        self.enabled = bool(enabled)
        self.on_forward = on_forward  # told (requests, images) of each forward
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinai-model")
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._carry: _Pending | None = None
        self._arriving = 0

    def start(self) -> None:
        """Start the batching task on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sinai-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's reading and checking: the batcher waits for it, not forwards without it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs for the rows of ``x``, computed in some forward."""
        self.start()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(x, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._next()]
            images = len(batch[0].x)
            if self.enabled:
                deadline = loop.time() + self.wait
                while images < self.max_images:
                    try:
                        item = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        timeout = deadline - loop.time()
                        if timeout <= 0 or not self._arriving:
                            break
                        try:
                            item = await asyncio.wait_for(self._queue.get(), timeout)
                        except asyncio.TimeoutError:
                            break
                    if images + len(item.x) > self.max_images:
                        self._carry = item  # heads the next batch
                        break
                    batch.append(item)
                    images += len(item.x)
            batch = [p for p in batch if not p.future.done()]  # cancelled: the client went away
            if not batch:
                continue
            x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
            try:
                out = await loop.run_in_executor(self._executor, self._chunked, x)
            except Exception as err:  # a bug or a device error: every waiting request fails with it
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            if self.on_forward is not None:
                self.on_forward(len(batch), len(x))
            start = 0
            for p in batch:
                stop = start + len(p.x)
                if not p.future.done():
                    p.future.set_result({k: v[start:stop] for k, v in out.items()})
                start = stop

    async def _next(self) -> _Pending:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        return await self._queue.get()

    def _chunked(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """One forward, or several of at most ``max_images`` for a request larger than that."""
        if len(x) <= self.max_images:
            return self.forward(x)
        parts = [self.forward(x[i : i + self.max_images]) for i in range(0, len(x), self.max_images)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
