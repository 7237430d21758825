"""Request dependencies: the database session, the caller, and role checks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine
from sqlmodel import Session

from stagegate.db import reader
from stagegate.errors import PermissionDenied, StagegateError
from stagegate.events.sink import EventSink
from stagegate.governance.authorship import ATTESTER_ROLES
from stagegate.governance.tokens import Principal, TokenRejected, authenticate
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


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.stagegate
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_session(request: Request, state: StateDep) -> Iterator[Session]:
    # Routes that write commit explicitly, before answering; anything else is rolled back.
    # GETs read without taking SQLite's write lock.
    engine = reader(state.engine) if request.method in ("GET", "HEAD") else state.engine
    with Session(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="An API token from `stagegate token create`.")


def current_principal(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None:
        raise Unauthenticated("missing bearer token")
    try:
        return authenticate(session, credentials.credentials)
    except TokenRejected as exc:  # unknown, revoked or expired, and the answer says which
        raise Unauthenticated(exc.detail) from None


def require(*roles: Role) -> Callable[[Principal], Principal]:
    """A dependency that lets only the given roles through (403 otherwise)."""
    allowed = frozenset(roles)

    def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
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
