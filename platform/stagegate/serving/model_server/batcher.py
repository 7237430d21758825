"""Adaptive micro-batching: concurrent requests share one predict call on a single worker thread.

An idle batcher predicts a lone request at once. While a predict runs, new requests queue; the
next call takes whatever queued, up to `max_rows`. It waits (at most `max_wait_s`) only for
requests it knows are on their way: ones whose bodies are still being read or parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    rows: int
    future: asyncio.Future[R]


class MicroBatcher(Generic[T, R]):
    """Queues items from the event loop and runs `run_batch` on them, one batch at a time."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        *,
        executor: Executor,
        max_rows: int,
        max_wait_s: float,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._max_rows = max_rows
        self._max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: deque[_Pending[T, R]] = deque()
        self._queued_rows = 0
        self._arriving = 0
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the predict thread (not counting the batch it is running)."""
        return len(self._queue)

    @contextlib.contextmanager
    def arrival(self) -> Iterator[None]:
        """Wrap reading and parsing a request, so a batch being formed may wait for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._notify()

    async def submit(self, item: T, rows: int) -> R:
        """Queue one item and wait for its result (raised if its batch failed as a whole)."""
        loop = asyncio.get_running_loop()
        pending: _Pending[T, R] = _Pending(item, rows, loop.create_future())
        self._queue.append(pending)
        self._queued_rows += rows
        if self._task is None:
            self._task = loop.create_task(self._drain())
        else:
            self._notify()
        return await pending.future

    async def close(self) -> None:
        """Wait until every queued item has been predicted."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if self._arriving and self._max_wait_s > 0:
                    await self._wait_for_arrivals(loop)
                batch = self._take()
                if not batch:
                    continue
                rows = sum(p.rows for p in batch)
                if self._on_batch is not None:
                    self._on_batch(rows, len(batch))
                items = [p.item for p in batch]
                try:
                    results = await loop.run_in_executor(self._executor, self._run_batch, items)
                except Exception as exc:  # the scorer's own bug: fail this batch, keep serving
                    logger.exception("a batch of %d request(s) failed", len(batch))
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                for p, result in zip(batch, results, strict=True):
                    if not p.future.done():  # its request may have been cancelled meanwhile
                        p.future.set_result(result)
        finally:
            self._task = None

    async def _wait_for_arrivals(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        deadline = loop.time() + self._max_wait_s
        while self._arriving and self._queued_rows < self._max_rows:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._changed.wait()
            except TimeoutError:
                return

    def _take(self) -> list[_Pending[T, R]]:
        """The oldest queued items up to `max_rows` rows (always at least one item)."""
        batch: list[_Pending[T, R]] = []
        rows = 0
        queue = self._queue
        while queue:
            nxt = queue[0]
            if batch and rows + nxt.rows > self._max_rows:
                break
            queue.popleft()
            self._queued_rows -= nxt.rows
            if nxt.future.done():
                continue  # cancelled while queued
            batch.append(nxt)
            rows += nxt.rows
        return batch
