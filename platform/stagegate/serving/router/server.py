"""The traffic router: sticky champion/challenger split, shadow mirrors, fallback, hot reload.

A raw ASGI app (no framework on the hot path) served by uvicorn with uvloop and httptools:

- `POST /models/{name}/invocations` forwards the body to the chosen arm's `{url}/invocations`.
- `GET /health` (open, for probes); `GET /metrics` (Prometheus) and `GET /policies` (the config
  in force), which need `Authorization: Bearer <admin token>` when the router has one.

It reloads its policy on SIGHUP and when the source changes, and drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import random
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST

from stagegate.errors import NotFoundError
from stagegate.serving.inference_log.records import InferenceLogWriter, InferenceRecord, Role
from stagegate.serving.policy import Arm
from stagegate.serving.router.assign import assign, key_from_field, key_hash
from stagegate.serving.router.config import PolicySource, PolicyStore, Route, RoutingTable
from stagegate.serving.router.http import JoinedWritesProtocol
from stagegate.serving.router.metrics import RouterMetrics
from stagegate.serving.router.mirror import MirrorJob, ShadowMirror
from stagegate.serving.router.upstream import (
    Response,
    Target,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)

log = logging.getLogger("stagegate.router")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

TRANSPORT_FAILURE = 599  # what the log and metrics record for "no HTTP answer"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_UNPARSED: Any = object()
_JSON = b"application/json"
_CHALLENGE = (b"www-authenticate", b'Bearer realm="stagegate-router"')


@dataclass(slots=True)
class _Attempt:
    """One arm's try at a request: its answer (None: transport error/timeout) and latency."""

    role: Role
    arm: Arm
    response: Response | None
    latency_ms: float
    timed_out: bool

    @property
    def failed(self) -> bool:
        return self.response is None or self.response.status >= 500

    @property
    def failure(self) -> str:
        if self.timed_out:
            return "timeout"
        return "error" if self.response is None else "5xx"

    @property
    def status(self) -> int:
        return TRANSPORT_FAILURE if self.response is None else self.response.status


class Router:
    """The ASGI app. `start()` before serving (or let ASGI lifespan do it), `stop()` after."""

    def __init__(
        self,
        source: PolicySource,
        writer: InferenceLogWriter | None = None,
        *,
        shadow_queue_size: int = 1000,
        shadow_workers: int = 8,
        poll_interval_s: float = 1.0,
        shadow_drain_s: float = 2.0,
        max_body_bytes: int = 16 * 2**20,
        seed: int | None = None,
        admin_token: str | None = None,
    ) -> None:
        """`admin_token`: what `/metrics` and `/policies` require; None leaves them open."""
        if admin_token is not None and not admin_token:
            raise ValueError("admin_token must not be empty (None leaves the admin paths open)")
        self._admin_token = None if admin_token is None else admin_token.encode()
        self.metrics = RouterMetrics()
        self.store = PolicyStore(source, on_result=lambda r: self.metrics.reloads.labels(r).inc())
        self._writer = writer
        self._pool = UpstreamPool(on_stale_retry=self.metrics.stale_retries.inc)
        self._mirror = ShadowMirror(
            self._shadow_done,
            self._shadow_dropped,
            queue_size=shadow_queue_size,
            workers=shadow_workers,
        )
        self._poll_interval_s = poll_interval_s
        self._shadow_drain_s = shadow_drain_s
        self._max_body = max_body_bytes
        self._rng = random.Random(seed)  # noqa: S311 - traffic splitting, not secrets
        self._background: set[asyncio.Task[Any]] = set()
        self._started = False
        self._stopped = False

    # lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the policy (an invalid one raises), start mirrors, polling and SIGHUP."""
        if self._started:
            return
        self._started = True
        await self.store.load()
        self._mirror.start()
        self._spawn(self.store.watch(self._poll_interval_s))
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)  # main thread only

    async def stop(self) -> None:
        """Finish shadows in flight (briefly), then flush and close the inference log."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._mirror.stop(self._shadow_drain_s)
        self._pool.close()
        if self._writer is not None:
            self._writer.close()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading the policy")
        self._spawn(self.store.reload(force=True))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ASGI -----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith("/models/") and path.endswith("/invocations"):
                if scope["method"] != "POST":
                    await _json(send, 405, {"detail": "use POST", "code": "method_not_allowed"})
                else:
                    await self._invoke(scope, receive, send, path[8:-12])
            elif path == "/health":
                await self._health(send)
            elif path in ("/metrics", "/policies"):
                refusal = self._refusal(scope)
                if refusal is not None:
                    await _json(send, 401, refusal, [_CHALLENGE])
                elif path == "/metrics":
                    await _reply(send, 200, self.metrics.render(), CONTENT_TYPE_LATEST.encode())
                else:
                    await self._policies(send)
            else:
                await _json(send, 404, {"detail": f"no route {path}", "code": "not_found"})
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _refusal(self, scope: Scope) -> dict[str, str] | None:
        """Why an admin request is refused (None: admitted). /policies tells where every model
        server listens and /metrics what traffic each gets: not for anyone who can connect."""
        if self._admin_token is None:
            return None
        given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if given is None:
            return {"detail": "missing bearer token", "code": "unauthenticated"}
        scheme, _, token = given.partition(b" ")
        # Constant time: how long the comparison takes says nothing about the token.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._admin_token):
            return {"detail": "wrong router admin token", "code": "unauthenticated"}
        return None

    async def _health(self, send: Send) -> None:
        table = self.store.table
        await _json(
            send,
            200,
            {
                "status": "ok",
                "generation": table.generation,
                "models": sorted(table.routes),
                "shadow_queued": self._mirror.queued,
            },
        )

    async def _policies(self, send: Send) -> None:
        table = self.store.table
        body = orjson.dumps(table.config.model_dump(mode="json"))
        await _reply(send, 200, body, _JSON, _table_headers(table, self.store.describe()))

    # the hot path ---------------------------------------------------------------------------

    async def _invoke(self, scope: Scope, receive: Receive, send: Send, model: str) -> None:
        arrived = time.time()
        table = self.store.table  # this request's snapshot, whatever reloads happen meanwhile
        rid, raw_key, content_type = _request_headers(scope)
        body = await _read_body(receive, self._max_body)
        route = table.routes.get(model)
        if body is None or route is None:
            await self._refuse(send, rid, model, too_large=body is None)
            return

        policy = route.policy
        key = raw_key.decode("utf-8", "replace") if raw_key else None
        parsed = _UNPARSED
        if key is None and route.needs_key and policy.assignment_field is not None:
            parsed = _loads(body)
            key = key_from_field(parsed, policy.assignment_field)
        role = assign(model, key, route.challenger_threshold, self._rng)
        headers = b"Content-Type: %s\r\nX-Request-Id: %s\r\n" % (content_type, rid)
        request_id = rid.decode("ascii")

        if route.shadow is not None and self._rng.random() < policy.shadow_fraction:
            self._mirror.submit(MirrorJob(route, body, headers, request_id, key))

        attempts = await self._attempts(route, role, body, headers)
        await _answer(send, attempts[-1], rid)

        # The answer has left: parsing for the log no longer adds to this client's latency.
        if self._writer is not None:
            inputs = _loads(body) if parsed is _UNPARSED else parsed
            for attempt in attempts:
                self._log(model, request_id, key, inputs, attempt, arrived, body, content_type)

    async def _attempts(
        self, route: Route, role: Role, body: bytes, headers: bytes
    ) -> list[_Attempt]:
        """The assigned arm, then the champion if a challenger failed and the policy says so."""
        policy = route.policy
        if role == Role.champion or route.challenger is None or policy.challenger is None:
            return [
                await self._call(
                    route, Role.champion, policy.champion, route.champion, body, headers
                )
            ]
        tried = await self._call(route, role, policy.challenger, route.challenger, body, headers)
        if not tried.failed:
            return [tried]
        self.metrics.fallbacks.labels(policy.model, tried.failure).inc()
        if not policy.fallback_to_champion:
            return [tried]
        # A fresh full timeout for the champion: worst case is twice timeout_ms.
        champion = await self._call(
            route, Role.champion, policy.champion, route.champion, body, headers
        )
        return [tried, champion]

    async def _refuse(self, send: Send, rid: bytes, model: str, *, too_large: bool) -> None:
        if too_large:
            detail = {"detail": "request body too large", "code": "invalid_input"}
            await _json(send, 413, detail, [(b"x-request-id", rid)])
            return
        self.metrics.unknown_models.inc()
        detail = {"detail": f"no policy for model {model!r}", "code": NotFoundError.code}
        await _json(send, 404, detail, [(b"x-request-id", rid)])

    async def _call(
        self, route: Route, role: Role, arm: Arm, target: Target, body: bytes, headers: bytes
    ) -> _Attempt:
        model = route.policy.model
        started = time.perf_counter()
        response: Response | None = None
        timed_out = False
        try:
            response = await self._pool.post(target, body, headers, route.timeout_s)
        except UpstreamTimeout:
            timed_out = True
        except UpstreamError as exc:
            log.debug("%s %s v%d failed: %s", model, role, arm.version, exc)
        elapsed = time.perf_counter() - started
        attempt = _Attempt(role, arm, response, elapsed * 1000, timed_out)
        version = str(arm.version)
        self.metrics.requests.labels(model, version, role, str(attempt.status)).inc()
        self.metrics.upstream_latency.labels(model, version, role).observe(elapsed)
        return attempt

    # shadows and the log (off the hot path) -------------------------------------------------

    def _shadow_done(self, job: MirrorJob, response: Response | None, latency_ms: float) -> None:
        route = job.route
        assert route.policy.shadow is not None
        arm = route.policy.shadow
        model = route.policy.model
        attempt = _Attempt(Role.shadow, arm, response, latency_ms, timed_out=False)
        version = str(arm.version)
        self.metrics.requests.labels(model, version, Role.shadow, str(attempt.status)).inc()
        self.metrics.upstream_latency.labels(model, version, Role.shadow).observe(latency_ms / 1000)
        self.metrics.shadow.labels(model, "failed" if attempt.failed else "mirrored").inc()
        if self._writer is not None:
            inputs, content_type = _loads(job.body), _content_type_of(job.headers)
            at = time.time()
            self._log(model, job.request_id, job.key, inputs, attempt, at, job.body, content_type)

    def _shadow_dropped(self, job: MirrorJob) -> None:
        self.metrics.shadow.labels(job.route.policy.model, "dropped").inc()

    def _log(
        self,
        model: str,
        request_id: str,
        key: str | None,
        inputs: Any,
        attempt: _Attempt,
        at: float,
        body: bytes,
        content_type: bytes,
    ) -> None:
        assert self._writer is not None
        response = attempt.response
        output = None
        if response is not None and 200 <= response.status < 300:
            parsed = _loads(response.body)
            output = parsed.get("predictions", parsed) if isinstance(parsed, dict) else parsed
        record = InferenceRecord(
            request_id=request_id,
            model=model,
            version=attempt.arm.version,
            role=attempt.role,
            key_hash=key_hash(key),
            inputs=inputs,
            output=output,
            status=attempt.status,
            latency_ms=attempt.latency_ms,
            at=datetime.fromtimestamp(at, UTC),
            body=body,  # decoded into feature rows by the writer's thread, not here
            content_type=content_type.decode("latin-1"),
        )
        try:
            self._writer.append(record)
        except Exception:  # the log must never break serving
            log.exception("inference log append failed")


# helpers -------------------------------------------------------------------------------------


def _request_headers(scope: Scope) -> tuple[bytes, bytes | None, bytes]:
    """The request id, the raw key and content type.

    The id is always the router's own: a sane client id is kept as its prefix, for the
    client's correlation, but a client can never choose (or collide) the id under which
    answers are logged, paired for the shadow report, and labelled."""
    raw_id = raw_key = None
    content_type = _JSON
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            raw_id = value
        elif name == b"x-stagegate-key":
            raw_key = value
        elif name == b"content-type":
            content_type = value
    own = uuid.uuid4().hex.encode()
    if raw_id is None or not _SANE_REQUEST_ID.fullmatch(raw_id):
        return own, raw_key, content_type
    return raw_id + b"~" + own[:16], raw_key, content_type


async def _answer(send: Send, final: _Attempt, rid: bytes) -> None:
    """The answering arm's status, body and content type, or 502/504 when it gave none."""
    meta = [
        (b"x-stagegate-version", b"%d" % final.arm.version),
        (b"x-stagegate-role", final.role.encode()),
        (b"x-request-id", rid),
    ]
    response = final.response
    if response is not None:
        await _reply(send, response.status, response.body, response.content_type, meta)
    elif final.timed_out:
        detail = {"detail": "the model timed out", "code": "upstream_timeout"}
        await _json(send, 504, detail, meta)
    else:
        detail = {"detail": "the model is unreachable", "code": "upstream_unavailable"}
        await _json(send, 502, detail, meta)


def _content_type_of(headers: bytes) -> bytes:
    """The Content-Type of a mirror job: the first of the headers `_invoke` forwards."""
    return headers[len(b"Content-Type: ") : headers.index(b"\r\n")]


def _loads(raw: bytes) -> Any:
    """Parsed JSON, or None when the bytes are not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body; None when it exceeds `limit`."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body if len(body) <= limit else None
    chunks = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _reply(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type or b"application/octet-stream"),
        (b"content-length", b"%d" % len(body)),  # else uvicorn chunks the body
    ]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(
    send: Send, status: int, payload: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _reply(send, status, orjson.dumps(payload), _JSON, extra)


def _table_headers(table: RoutingTable, source: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-stagegate-policy-generation", b"%d" % table.generation),
        (b"x-stagegate-policy-loaded-at", table.loaded_at.isoformat().encode()),
        (b"x-stagegate-policy-source", source.encode("utf-8", "replace")),
    ]


# serving -------------------------------------------------------------------------------------


class _DrainingServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown; a finished drain exits 0 here."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C: stop waiting
        else:
            self.should_exit = True


async def run(
    router: Router,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    drain_timeout_s: int = 30,
    log_level: str = "info",
) -> None:
    """Serve until SIGTERM/SIGINT, then drain: no new connections, in-flight requests and
    their log records finish, the log is closed."""
    config = uvicorn.Config(
        router,
        host=host,
        port=port,
        loop="none",  # ours: serve() runs inside it
        http=JoinedWritesProtocol,
        lifespan="off",  # started and stopped around serve() instead
        access_log=False,
        proxy_headers=False,  # a middleware per request; we read no forwarded headers
        server_header=False,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout_s,
    )
    try:
        await router.start()
        config.load()
        # Everything loaded so far lives as long as the process: keep it out of the cyclic
        # GC's full collections, which would otherwise walk it and stall requests (p99).
        gc.freeze()
        await _DrainingServer(config).serve()
    finally:
        await router.stop()


def serve(router: Router, **kwargs: Any) -> None:
    """`run()` on a fresh uvloop event loop."""
    import uvloop

    # Until the loop's handler is in place, a SIGHUP (a deploy tool that just wrote the
    # policy) must not kill the process, which SIGHUP's default action would.
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    uvloop.run(run(router, **kwargs))


def writer_for(
    log_dir: str | None, *, features_flush_interval_s: float | None = None
) -> InferenceLogWriter | None:
    """The inference log under `log_dir` when the log module is installed, else None.
    `features_flush_interval_s`: how long decoded feature rows may wait for a bigger file."""
    if log_dir is None:
        return None
    import importlib

    try:
        module = importlib.import_module("stagegate.serving.inference_log.writer")
    except ImportError:
        log.warning(
            "stagegate.serving.inference_log.writer is not available: not logging inferences"
        )
        return None
    options = (
        {}
        if features_flush_interval_s is None
        else {"features_flush_interval_s": features_flush_interval_s}
    )
    writer: InferenceLogWriter = module.LocalInferenceLog(log_dir, **options)
    return writer
