"""Request dependencies: the database session, the caller, and role checks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from stagegate.db import reader, utcnow
from stagegate.errors import PermissionDenied, StagegateError
from stagegate.events.sink import EventSink
from stagegate.governance.authorship import ATTESTER_ROLES
from stagegate.governance.tokens import Principal, TokenCache, TokenRejected, authenticate
from stagegate.lifecycle.decisions import DECIDER_ROLES, role_refusal
from stagegate.lifecycle.stages import Role
from stagegate.settings import Settings


class Unauthenticated(StagegateError):
    code = "unauthenticated"


@dataclass
class AppState:
    settings: Settings
    engine: Engine
    sink: EventSink
    tokens: TokenCache


# The dependencies that do no I/O are `async`: FastAPI runs a sync one on the thread pool, a
# hop that costs more than the work itself. Only the route, and a token not yet cached, go there.


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.stagegate
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(request: Request, state: StateDep) -> AsyncIterator[Session]:
    # Routes that write commit explicitly, before answering; anything else is rolled back.
    # GETs read without taking SQLite's write lock. A Session connects on its first query, so
    # making one here costs no I/O. Closing one that holds a connection (a rollback) is I/O,
    # done on the thread pool; StrictRoute's routes have closed theirs already, on their thread.
    engine = reader(state.engine) if request.method in ("GET", "HEAD") else state.engine
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API token from `stagegate token create`.")


async def current_principal(
    session: SessionDep,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise Unauthenticated("missing bearer token")
    secret, now = credentials.credentials, utcnow()
    if (cached := state.tokens.get(secret, now)) is not None:
        return cached
    generation = state.tokens.generation()
    try:
        principal = await run_in_threadpool(authenticate, session, secret, now=now)
    except TokenRejected as exc:  # unknown, revoked or expired, and the answer says which
        raise Unauthenticated(exc.detail) from None
    state.tokens.put(secret, principal, generation)
    return principal


def require(*roles: Role) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency that lets only the given roles through (403 otherwise)."""
    allowed = frozenset(roles)

    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if principal.role not in allowed:
            raise PermissionDenied(role_refusal(principal.role, allowed))
        return principal

    check.__stagegate_authz__ = True  # type: ignore[attr-defined]  # found by the route audit
    check.__stagegate_roles__ = allowed  # type: ignore[attr-defined]  # and by the 403 audit
    return check


ANYONE = (Role.viewer, Role.author, Role.approver, Role.admin, Role.service)
Viewer = Annotated[Principal, Depends(require(*ANYONE))]
Requester = Annotated[Principal, Depends(require(Role.author, Role.admin, Role.service))]
# Who may reach the decision route; `decide` then applies the policy (lifecycle/decisions.py).
Decider = Annotated[Principal, Depends(require(*DECIDER_ROLES))]
Admin = Annotated[Principal, Depends(require(Role.admin))]
# Who may attest authorship of a version: people who write models, never the service.
Attester = Annotated[Principal, Depends(require(*ATTESTER_ROLES))]
