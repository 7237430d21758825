"""`stagegate serve-model`: an MLflow-compatible model server (ASGI app and its uvicorn runner).

Routes: POST /invocations (mlflow's scoring protocol), GET /health and /ping (200 once the
model is loaded, 503 before), GET /version, GET /metrics (Prometheus text).
The port opens at once; the model loads in the background on the predict thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from stagegate import __version__
from stagegate.errors import InvalidInput, PermanentError
from stagegate.serving.model_server.batcher import MicroBatcher
from stagegate.serving.model_server.device import check_device
from stagegate.serving.model_server.metrics import ModelServerMetrics
from stagegate.serving.model_server.scoring import (
    INTERNAL_ERROR,
    LoadedModel,
    Parsed,
    ScoringError,
    media_type_of,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_ROWS = 64
DEFAULT_MAX_WAIT_MS = 2.0
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
GRACEFUL_SHUTDOWN_S = 30
PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed on a helper thread

_JSON = b"application/json"
_HEALTHY = b'{"status":"ready"}'
_LOADING = b'{"status":"loading"}'
_CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


class _ClientGone(Exception):
    pass


class ModelServer:
    """The ASGI app. Loads on lifespan startup (in the background), drains on shutdown."""

    def __init__(
        self,
        load: Callable[[], LoadedModel],
        *,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        on_load_failed: Callable[[BaseException], None] | None = None,
    ) -> None:
        if max_batch_rows < 1 or max_wait_ms < 0 or max_body_bytes < 1:
            raise InvalidInput("max_batch_rows and max_body_bytes must be >= 1, max_wait_ms >= 0")
        self._load = load
        self._on_load_failed = on_load_failed
        self._max_body_bytes = max_body_bytes
        # One thread: it loads the model, then runs every predict, one at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stagegate-predict")
        self.model: LoadedModel | None = None
        self.load_error: str | None = None
        self._load_task: asyncio.Task[None] | None = None  # held: the loop keeps weak refs
        self.batcher: MicroBatcher[Parsed, bytes | ScoringError] = MicroBatcher(
            self._predict,
            executor=self._executor,
            max_rows=max_batch_rows,
            max_wait_s=max_wait_ms / 1000,
            on_batch=self._on_batch,
        )
        self.metrics = ModelServerMetrics(queue_depth=lambda: self.batcher.depth)

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/invocations":
            if method == "POST":
                await self._invocations(scope, receive, send)
            else:
                await _error(send, ScoringError(405, "BAD_REQUEST", "POST your input here"))
        elif method not in ("GET", "HEAD"):
            await _error(send, ScoringError(405, "BAD_REQUEST", f"{method} is not allowed here"))
        elif path in ("/health", "/ping"):
            await self._health(send)
        elif path == "/version":
            await _respond(send, 200, orjson.dumps(self.version()))
        elif path == "/metrics":
            await _respond(
                send, 200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8"
            )
        else:
            await _error(send, ScoringError(404, "ENDPOINT_NOT_FOUND", f"no route {path}"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._load_task = asyncio.get_running_loop().create_task(self._load_model())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- routes ---------------------------------------------------------------------------

    async def _health(self, send: Send) -> None:
        if self.model is not None:
            await _respond(send, 200, _HEALTHY)
        elif self.load_error is not None:
            body = orjson.dumps({"status": "failed", "message": self.load_error})
            await _respond(send, 503, body)
        else:
            await _respond(send, 503, _LOADING)

    def version(self) -> dict[str, Any]:
        state = "ready" if self.model else ("failed" if self.load_error else "loading")
        info = dict(self.model.info) if self.model else {}
        return {"status": state, "server": f"stagegate {__version__}", **info}

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        close = False
        try:
            status, body = 200, await self._score(scope, receive)
        except ScoringError as exc:
            status, body = exc.status, exc.body()
            close = status == 413  # the rest of the body is not read: drop the connection
        except _ClientGone:
            self.metrics.answered(_CLIENT_CLOSED, time.perf_counter() - started)
            return
        except Exception:
            logger.exception("scoring request failed")
            status, body = 500, ScoringError(500, INTERNAL_ERROR, "internal error").body()
        await _respond(send, status, body, close=close)
        self.metrics.answered(status, time.perf_counter() - started)

    async def _score(self, scope: Scope, receive: Receive) -> bytes:
        model = self.model
        if model is None:
            message = "the model failed to load" if self.load_error else "the model is loading"
            raise ScoringError(503, "TEMPORARILY_UNAVAILABLE", message)
        content_type: str | None = None
        length: int | None = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                length = int(value) if value.isdigit() else None
        if length is not None and length > self._max_body_bytes:
            raise _too_large(self._max_body_bytes)
        with self.batcher.arrival():
            body = await self._read_body(receive)
            media_type = media_type_of(content_type)
            # A scorer may ask for every parse off the loop (`inline_parse_bytes = 0`).
            if len(body) <= getattr(model.scorer, "inline_parse_bytes", PARSE_INLINE_BYTES):
                parsed = model.scorer.parse(body, media_type)
            else:  # megabytes take milliseconds to parse: keep the event loop serving meanwhile
                loop = asyncio.get_running_loop()
                parsed = await loop.run_in_executor(None, model.scorer.parse, body, media_type)
        result = await self.batcher.submit(parsed, parsed.rows)
        if isinstance(result, ScoringError):
            if result.status >= 500:
                self.metrics.predict_errors.inc()
            raise result
        return result

    async def _read_body(self, receive: Receive) -> bytes:
        """The request body, counted as it streams in: refused once past `max_body_bytes`."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                raise _too_large(self._max_body_bytes)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- model and predict thread -----------------------------------------------------------

    async def _load_model(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            model = await loop.run_in_executor(self._executor, self._load)
        except Exception as exc:
            logger.exception("the model failed to load")
            self.load_error = f"{type(exc).__name__}: {exc}"[:2000]
            if self._on_load_failed is not None:
                self._on_load_failed(exc)
            return
        self.metrics.load_seconds.set(time.perf_counter() - started)
        self.metrics.loaded.set(1)
        # mlflow and sklearn leave ~1M long-lived objects: a full GC pass over them stalls
        # requests for ~0.2 s. Freezing moves them out of the collector's view.
        gc.collect()
        gc.freeze()
        self.model = model

    def _predict(self, batch: list[Parsed]) -> list[bytes | ScoringError]:
        model = self.model
        assert model is not None  # requests are refused (503) until it is set
        return model.scorer.predict(batch)

    def _on_batch(self, rows: int, requests: int) -> None:
        self.metrics.batch(rows, requests)

    @property
    def loading(self) -> bool:
        return self.model is None and self.load_error is None

    async def shutdown(self) -> None:
        """Finish what is queued, then stop the predict thread; a load in progress is abandoned."""
        await self.batcher.close()
        if self.loading:
            self._executor.shutdown(wait=False, cancel_futures=True)
        else:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)


def _too_large(limit: int) -> ScoringError:
    return ScoringError(413, "BAD_REQUEST", f"The request body is larger than {limit} bytes.")


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = _JSON, *, close: bool = False
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, error: ScoringError) -> None:
    await _respond(send, error.status, error.body())


def create_app(
    model_uri: str,
    *,
    tracking_uri: str | None = None,
    device: str = "auto",
    max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_load_failed: Callable[[BaseException], None] | None = None,
    expect_digest: str | None = None,
) -> ModelServer:
    """The app for `model_uri`; it starts loading when the ASGI lifespan starts."""

    def load() -> LoadedModel:
        from stagegate.serving.model_server.loader import (
            load_model,  # mlflow costs seconds to import
        )

        return load_model(
            model_uri, tracking_uri=tracking_uri, device=device, expect_digest=expect_digest
        )

    return ModelServer(
        load,
        max_batch_rows=max_batch_rows,
        max_wait_ms=max_wait_ms,
        max_body_bytes=max_body_bytes,
        on_load_failed=on_load_failed,
    )


def serve(
    model_uri: str,
    *,
    host: str,
    port: int,
    device: str,
    max_batch_rows: int,
    max_wait_ms: float,
    max_body_bytes: int,
    tracking_uri: str | None,
    expect_digest: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight requests and return.

    Raises InvalidInput for bad options (a CUDA device this machine lacks included), before the
    port opens, and PermanentError when the model cannot be loaded.
    """
    import uvicorn

    check_device(device)
    # What `mlflow models serve` sets: type-hinted pyfunc models then parse their inputs.
    os.environ.setdefault("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
    failures: list[BaseException] = []

    def load_failed(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True  # a server that can never answer should not look alive

    app = create_app(
        model_uri,
        tracking_uri=tracking_uri,
        device=device,
        max_batch_rows=max_batch_rows,
        max_wait_ms=max_wait_ms,
        max_body_bytes=max_body_bytes,
        on_load_failed=load_failed,
        expect_digest=expect_digest,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the stop signal once it has shut down gracefully, which would end the
    # process with "killed by SIGTERM"; a no-op handler makes a requested stop exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    server.run()
    if failures:
        raise PermanentError(f"could not load {model_uri}: {failures[0]}")
    if app.loading:
        # Stopped mid-load: the load thread cannot be interrupted and would hold the exit
        # until a possibly long download ends. Nothing is left to flush but the logs.
        logger.warning("stopped while the model was still loading")
        logging.shutdown()
        os._exit(0)


def _stopped(signum: int, frame: object) -> None:
    """Runs after uvicorn's own graceful shutdown has finished: nothing is left to do."""
