"""What every route refuses before its handler runs, as the create models refuse extra fields.

- **JSON beyond RFC 8259.** Python's parser accepts `NaN`, `Infinity` and `1e400` (as inf).
  Pydantic lets inf through `gt=0`, the API then echoed it as `null` against its own schema,
  PostgreSQL refuses to store it, and a flow would wait forever.
- **Query parameters the route does not declare.** `?ofset=50` would otherwise be ignored
  without a word, and the client would read the first page as if it were the next.

Both are a 422 like any other invalid request. Every router uses `StrictRoute`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
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


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters of the route and of all its dependencies."""
    names: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        names.update(field.alias for field in current.query_params)
        stack.extend(current.dependencies)
    return names


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictRoute(APIRoute):
    """An APIRoute that parses JSON with `loads` and refuses undeclared query parameters."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        declared = _query_names(self.dependant)

        async def strict(request: Request) -> Response:
            unknown = [name for name in request.query_params if name not in declared]
            if unknown:
                raise RequestValidationError(
                    [
                        {
                            "type": "extra_forbidden",
                            "loc": ("query", name),
                            "msg": "unknown query parameter; this route takes "
                            + (", ".join(sorted(declared)) or "none"),
                        }
                        for name in dict.fromkeys(unknown)
                    ]
                )
            return await handle(StrictJsonRequest(request.scope, request.receive))

        return strict
