"""Limits every request meets before routing, authentication or JSON parsing.

An unauthenticated client must not make the API read (or parse) more than it would accept
from anyone: bodies over `max_body_bytes` are refused from their Content-Length, or as soon
as the stream passes it, and JSON nested deeper than `max_json_depth` is refused before
Python's parser recurses into it. Numbers that reach the database are bounded too.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BeforeValidator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# PostgreSQL's INTEGER, and far inside SQLite's 64 bits: versions, offsets, counts.
MAX_INT = 2**31 - 1
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


def _in_range(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is not None and not EARLIEST <= value < LATEST:
        raise ValueError(f"must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}")
    return value


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_text(value: Any) -> Any:
    # Pydantic would read `0.5` or `1e9` as seconds since 1970; an instant here is ISO-8601.
    if isinstance(value, str) and not _ISO_DATE.match(value):
        raise ValueError("must be an ISO-8601 instant, e.g. 2026-11-27T10:00:00Z")
    return value


Instant = Annotated[datetime, BeforeValidator(_iso_text), AfterValidator(_in_range)]


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True if brackets outside strings nest deeper than `limit` (a linear scan, no parse)."""
    if body.count(b"[") + body.count(b"{") <= limit:  # cannot nest deeper than it opens
        return False
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


class RequestLimits:
    """Pure ASGI middleware: 413 for a body too large, 422 for JSON nested too deep."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_json_depth: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            await _refuse(send, 413, f"request body over {self.max_body_bytes} bytes", "too_large")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _refuse(
                    send, 413, f"request body over {self.max_body_bytes} bytes", "too_large"
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and json_depth_exceeds(body, self.max_json_depth):
            await _refuse(
                send, 422, f"JSON nested deeper than {self.max_json_depth} levels", "too_deep"
            )
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: only a disconnect can come

    return replayed


async def _refuse(send: Send, status: int, detail: str, code: str) -> None:
    payload: Any = {"detail": detail, "code": code}
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
