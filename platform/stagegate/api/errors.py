"""One place that maps errors to HTTP: `{"detail": ..., "code": ...}`, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from stagegate.api.deps import Unauthenticated
from stagegate.errors import (
    ConflictError,
    InvalidInput,
    NotFoundError,
    PermanentError,
    PermissionDenied,
    RetryableError,
    StagegateError,
    TransitionRejected,
)
from stagegate.events.signature import InvalidDelivery

log = logging.getLogger(__name__)

STATUS: list[tuple[type[StagegateError], int]] = [
    (Unauthenticated, 401),
    (InvalidDelivery, 401),
    (PermissionDenied, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (TransitionRejected, 409),
    (InvalidInput, 422),
    (RetryableError, 503),
    (PermanentError, 502),
]


def _body(
    detail: object, code: str, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(StagegateError)
    async def _stagegate(_: Request, exc: StagegateError) -> JSONResponse:
        status = next((s for kind, s in STATUS if isinstance(exc, kind)), 400)
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
        if isinstance(exc, RetryableError):
            headers = {"Retry-After": str(max(1, round(exc.delay_s)))}
        return _body(exc.detail, exc.code, status, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")}
            for e in exc.errors()
        ]
        return _body(errors, "invalid_request", 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _body(exc.detail, "http_error", exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, exc: IntegrityError) -> JSONResponse:
        log.info("integrity conflict: %s", exc.orig)
        return _body("conflicting concurrent change; retry", "conflict", 409)

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database error: %s", exc.orig)
        return _body("database unavailable; retry", "retryable", 503, {"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _body("internal error; see the server log", "internal", 500)
