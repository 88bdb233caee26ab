"""Dynamic batching: the images of concurrent requests go through the model in one forward pass.

A request hands its images (one or more) to :meth:`Batcher.submit` and awaits its logits. One task collects
what is waiting: it takes the first request, then waits at most ``max_wait_ms`` for others until ``max_batch``
images are gathered, and runs the batch on a single inference thread (the event loop keeps accepting and
decoding meanwhile; the model's own intra-op threads do the parallel work). While a batch runs, new requests
queue up, so under load batches fill without waiting: the wait only costs latency when the server is idle.
This is the scheme of TorchServe's ``batch_size`` / ``max_batch_delay`` and LitServe's ``max_batch_size`` /
``batch_timeout``. ``max_batch=1`` turns batching off: one request per forward pass, in arrival order.

:meth:`Batcher.flush` (called on Ctrl-C) ends every wait at once, so requests in flight are answered
without waiting for batches that will not fill.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class BatchStats:
    requests: int = 0
    images: int = 0
    batches: int = 0
    largest: int = 0

    def to_dict(self) -> dict:
        return {"requests": self.requests, "images": self.images, "batches": self.batches,
                "mean_batch": round(self.images / self.batches, 3) if self.batches else 0.0,
                "largest_batch": self.largest}


class Batcher:
    """Runs ``fn`` (uint8 images (N, S, S, 3) -> logits (N, C)) on batches of concurrently submitted images."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._pending_images = 0
        self._wake: asyncio.Event | None = None
        self._flushing = False
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cifarlab-infer")
        self._task = asyncio.create_task(self._run(), name="cifarlab-batcher")

    async def stop(self) -> None:
        """Answer what is queued, then end the collecting task and the inference thread."""
        self._stopping = True
        self.flush()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def flush(self) -> None:
        """From now on, run batches at once instead of waiting for them to fill (shutdown)."""
        self._flushing = True
        if self._wake is not None:
            self._wake.set()

    def flush_threadsafe(self) -> None:
        """:meth:`flush` from a signal handler or another thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.flush)

    # --------------------------------------------------------------- request
    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, C) for ``images`` (N, S, S, 3) uint8, computed in some batch with other requests' images."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((images, fut))
        self._pending_images += len(images)
        self._wake.set()
        return await fut

    # ----------------------------------------------------------------- batches
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
            deadline = loop.time() + self.max_wait
            while self._pending_images < self.max_batch and not self._flushing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            await self._run_batch(self._take())

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        """Requests in arrival order up to ``max_batch`` images (at least one request, however large)."""
        items, n = [], 0
        while self._pending and (not items or n + len(self._pending[0][0]) <= self.max_batch):
            images, fut = self._pending.popleft()
            self._pending_images -= len(images)
            if fut.done():  # the client went away (the request was cancelled) while it waited
                continue
            items.append((images, fut))
            n += len(images)
        return items

    async def _run_batch(self, items: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        if not items:
            return
        x = items[0][0] if len(items) == 1 else np.concatenate([im for im, _ in items])
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, self.fn, x)
        except Exception as e:  # noqa: BLE001 - every waiting request gets the error; the batcher lives on
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(e)
            return
        s = self.stats
        s.requests += len(items)
        s.images += len(x)
        s.batches += 1
        s.largest = max(s.largest, len(x))
        start = 0
        for images, fut in items:
            if not fut.done():
                fut.set_result(logits[start:start + len(images)])
            start += len(images)
