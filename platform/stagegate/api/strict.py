"""What every route refuses before its handler runs, as the create models refuse extra fields.

- **JSON beyond RFC 8259.** Python's parser accepts `NaN`, `Infinity` and `1e400` (as inf).
  Pydantic lets inf through `gt=0`, the API then echoed it as `null` against its own schema,
  PostgreSQL refuses to store it, and a flow would wait forever.
- **Query parameters the route does not declare, or a single-valued one given twice.**
  `?ofset=50` would otherwise be ignored without a word, and the client would read the first
  page as if it were the next; of `?status=pending&status=applied` only the last would count.

Both are a 422 like any other invalid request. Every router uses `StrictRoute`.

It also closes a sync route's database session on the route's own worker thread, as the route
returns: closing is I/O (a rollback), and the session dependency would otherwise need a second
trip through the thread pool, which costs more CPU than a short query.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any, get_args, get_origin

from fastapi import Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlmodel import Session


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


def _takes_many(annotation: Any) -> bool:
    """A list-like parameter (`list[str]`, `list[str] | None`) may be repeated."""
    if get_origin(annotation) in (list, tuple, set, frozenset):
        return True
    return any(_takes_many(arg) for arg in get_args(annotation))


def _query_params(dependant: Dependant) -> dict[str, bool]:
    """The query parameters of the route and of all its dependencies: name -> may repeat."""
    params: dict[str, bool] = {}
    stack = [dependant]
    while stack:
        current = stack.pop()
        for field in current.query_params:
            params[field.alias] = _takes_many(field.field_info.annotation)
        stack.extend(current.dependencies)
    return params


def _query_issues(request: Request, declared: dict[str, bool]) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = []
    takes = ", ".join(sorted(declared)) or "none"
    for name in dict.fromkeys(request.query_params):
        if name not in declared:
            msg, kind = f"unknown query parameter; this route takes {takes}", "extra_forbidden"
        elif not declared[name] and len(request.query_params.getlist(name)) > 1:
            msg, kind = "given more than once; it takes one value", "multiple_values"
        else:
            continue
        issues.append({"type": kind, "loc": ("query", name), "msg": msg})
    return issues


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


def _closing_sessions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A sync endpoint that closes the sessions it was given once it returns or raises.

    Routes commit what they mean to keep before returning and answer with plain values, so
    nothing reads the session afterwards; an uncommitted change is rolled back, as before.
    FastAPI reads the signature and annotations through `__wrapped__`, so the dependencies and
    the response model are the endpoint's own."""
    if inspect.iscoroutinefunction(endpoint):
        return endpoint

    @functools.wraps(endpoint)
    def closing(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()

    return closing


class StrictRoute(APIRoute):
    """An APIRoute that parses JSON with `loads` and checks the query's names and counts."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, _closing_sessions(endpoint), **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        declared = _query_params(self.dependant)

        async def strict(request: Request) -> Response:
            if issues := _query_issues(request, declared):
                raise RequestValidationError(issues)
            return await handle(StrictJsonRequest(request.scope, request.receive))

        return strict
