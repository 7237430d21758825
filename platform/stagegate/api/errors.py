"""One place that maps errors to HTTP: `{"detail": ..., "code": ...}`, never a traceback.

`responses(...)` declares a route's error answers in the OpenAPI document, each with that
body, so clients (and the fuzzer in tests/test_fuzz_api.py) know every status a route gives.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from stagegate.api.deps import Unauthenticated
from stagegate.api.schemas import ErrorPublic
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


# Why each error status is answered; a route declares those it can give with `responses()`.
REASONS: dict[int, str] = {
    401: "No valid credentials: a missing, unknown or revoked token (the webhook: a missing "
    "or wrong signature, or a stale timestamp).",
    403: "The caller's role may not do this, or separation of duties forbids it.",
    404: "The named model, version, endpoint or transition does not exist.",
    409: "The state changed since the caller looked, or the request repeats one already "
    "processed; re-read and retry.",
    413: "The body is over the API's size limit; refused before it is read or authenticated.",
    422: "The request is invalid: a field, parameter or number out of range, an unknown query "
    "parameter, JSON beyond RFC 8259, or JSON nested too deep (refused before parsing).",
    503: "The database, the event bus or the inference log is unavailable; retry after "
    "`Retry-After` seconds.",
}

_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "`Bearer` (not on the webhook)",
            "schema": {"type": "string"},
        }
    },
    503: {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}},
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer, all with `ErrorPublic`."""
    unknown = set(statuses) - REASONS.keys()
    if unknown:
        raise ValueError(f"no reason written for status {sorted(unknown)}")
    declared: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        declared[status] = {"model": ErrorPublic, "description": REASONS[status]}
        if status in _HEADERS:
            declared[status]["headers"] = _HEADERS[status]
    return declared


def _body(
    detail: object, code: str, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code}, status_code=status, headers=headers)


def _message(error: dict[str, Any]) -> str:
    message = str(error.get("msg"))
    reason = (error.get("ctx") or {}).get("error")
    if error.get("type") == "json_invalid" and reason:  # say what is wrong with the JSON
        message = f"{message}: {reason}"
    return message


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
            {"loc": list(e.get("loc", ())), "msg": _message(e), "type": e.get("type")}
            for e in exc.errors()
        ]
        return _body(errors, "invalid_request", 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's 400 for a JSON body that is not UTF-8: invalid like any bad body, 422.
            issue = {"loc": ["body"], "msg": "body is not UTF-8 JSON", "type": "json_invalid"}
            return _body([issue], "invalid_request", 422)
        return _body(exc.detail, "http_error", exc.status_code, dict(exc.headers or {}))

    @app.exception_handler(IntegrityError)
    async def _integrity(_: Request, exc: IntegrityError) -> JSONResponse:
        log.info("integrity conflict: %s", exc.orig)
        return _body("conflicting concurrent change; retry", "conflict", 409)

    @app.exception_handler(PoolTimeout)
    async def _pool_busy(_: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("database pool exhausted: %s", exc)
        return _body("database busy; retry", "retryable", 503, {"Retry-After": "1"})

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database error: %s", exc.orig)
        return _body("database unavailable; retry", "retryable", 503, {"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _body("internal error; see the server log", "internal", 500)
