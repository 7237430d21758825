"""JSON bodies as RFC 8259 defines them: no `NaN` or `Infinity`, no number that overflows.

Python's parser accepts `NaN`, `Infinity` and `1e400` (as inf). Pydantic lets inf through
`gt=0`, the API then echoes it as `null` against its own schema, PostgreSQL refuses to store
it, and a flow would wait forever. Every router uses `StrictJsonRoute`, so such a body is a
422 `json_invalid` like any other malformed JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"{text} is out of a float's range", text, 0)
    return value


def loads(body: bytes) -> Any:
    """`json.loads` that refuses what RFC 8259 does not allow (a `JSONDecodeError`)."""
    return json.loads(body, parse_constant=_no_constant, parse_float=_finite)


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """An APIRoute whose handler parses the JSON body with `loads` above."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handle(StrictJsonRequest(request.scope, request.receive))

        return strict
