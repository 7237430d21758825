"""Shadow mirroring: bounded queues drained by a few tasks, on a connection pool of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from stagegate.serving.router.config import Route
from stagegate.serving.router.upstream import Response, UpstreamError, UpstreamPool

log = logging.getLogger("stagegate.router")


@dataclass(frozen=True, slots=True)
class MirrorJob:
    """One request to replay against a shadow."""

    route: Route
    body: bytes
    headers: bytes
    request_id: str
    key: str | None


# Called with the job, the shadow's answer (None on a transport error or timeout) and latency.
MirrorDone = Callable[[MirrorJob, Response | None, float], None]


class _Lane:
    """One shadow upstream's queue and workers: a slow shadow only ever delays itself."""

    def __init__(self, mirror: ShadowMirror, queue_size: int, workers: int) -> None:
        self.queue: asyncio.Queue[MirrorJob] = asyncio.Queue(maxsize=queue_size)
        self.tasks = [asyncio.create_task(mirror._work(self.queue)) for _ in range(workers)]


class ShadowMirror:
    """Fire-and-forget: `submit` never waits, and nothing a shadow does reaches the caller.

    Each shadow upstream gets its own bounded queue (`queue_size`) drained by `workers` tasks.
    """

    def __init__(
        self,
        on_done: MirrorDone,
        on_drop: Callable[[MirrorJob], None],
        *,
        queue_size: int = 1000,
        workers: int = 8,
    ) -> None:
        if queue_size < 1 or workers < 1:
            raise ValueError("need queue_size >= 1 and workers >= 1")
        self._on_done = on_done
        self._on_drop = on_drop
        self._queue_size = queue_size
        self._workers = workers
        self._lanes: dict[tuple[str, int], _Lane] = {}
        # Shadows get their own connections: a slow one cannot take the live arms' sockets.
        self._pool = UpstreamPool()
        self._accepting = False

    def start(self) -> None:
        self._accepting = True

    def submit(self, job: MirrorJob) -> bool:
        """Queue the job, or drop it (and say so) when its queue is full or we are stopping."""
        if self._accepting:
            shadow = job.route.shadow
            assert shadow is not None
            lane = self._lanes.get((shadow.host, shadow.port))
            if lane is None:
                lane = self._lanes[(shadow.host, shadow.port)] = _Lane(
                    self, self._queue_size, self._workers
                )
            try:
                lane.queue.put_nowait(job)
            except asyncio.QueueFull:
                pass
            else:
                return True
        self._on_drop(job)
        return False

    async def stop(self, grace_s: float) -> None:
        """Stop taking jobs, give queued ones `grace_s` to finish, then drop the rest."""
        self._accepting = False
        lanes = list(self._lanes.values())
        if lanes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(lane.queue.join() for lane in lanes)), grace_s
                )
        tasks = [task for lane in lanes for task in lane.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lane in lanes:
            while not lane.queue.empty():
                self._on_drop(lane.queue.get_nowait())
        self._pool.close()

    @property
    def queued(self) -> int:
        return sum(lane.queue.qsize() for lane in self._lanes.values())

    async def _work(self, queue: asyncio.Queue[MirrorJob]) -> None:
        while True:
            job = await queue.get()
            try:
                await self._mirror(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a worker must outlive any bug in one job
                log.exception("shadow mirror of request %s failed", job.request_id)
            finally:
                queue.task_done()

    async def _mirror(self, job: MirrorJob) -> None:
        route = job.route
        assert route.shadow is not None
        started = time.perf_counter()
        response: Response | None
        try:
            response = await self._pool.post(
                route.shadow, job.body, job.headers, route.shadow_timeout_s
            )
        except UpstreamError:
            response = None
        self._on_done(job, response, (time.perf_counter() - started) * 1000)
