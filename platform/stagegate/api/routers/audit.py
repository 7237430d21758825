"""The audit log: read it, verify its chain."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from stagegate.api import schemas
from stagegate.api.deps import SessionDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT, Instant
from stagegate.api.strict import StrictRoute
from stagegate.errors import InvalidInput
from stagegate.governance import audit

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], route_class=StrictRoute)


@router.get("", responses=responses(401, 422, 503))
def list_audit(
    session: SessionDep,
    _: Viewer,
    action: Annotated[str | None, Query(max_length=60, description="e.g. approval.approve")] = None,
    actor: Annotated[str | None, Query(max_length=100)] = None,
    entity_type: Annotated[str | None, Query(max_length=40, description="e.g. transition")] = None,
    entity_id: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[
        Instant | None, Query(description="ISO-8601 instant with a timezone; rows at or after")
    ] = None,
    until: Annotated[
        Instant | None, Query(description="ISO-8601 instant with a timezone; rows before")
    ] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=schemas.MAX_PAGE)] = 50,
) -> schemas.AuditPublic:
    """Rows newest first, filtered by exact action, actor and entity, and by time."""
    for label, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"`{label}` needs a timezone, e.g. 2026-11-27T10:00:00Z")
    if since is not None and until is not None and since > until:
        raise InvalidInput("`since` is after `until`")
    rows = audit.entries(
        session,
        action=action,
        actor=actor,
        entity_type=entity_type,
        entity_id=entity_id,
        since=since,
        until=until,
        offset=offset,
        limit=limit,
    )
    return schemas.AuditPublic(
        data=[schemas.AuditEntryPublic.model_validate(r, from_attributes=True) for r in rows],
        offset=offset,
        limit=limit,
    )


@router.get("/verify", responses=responses(401, 422, 503))
def verify(session: SessionDep, _: Viewer) -> schemas.AuditVerifyPublic:
    r = audit.verify(session)
    return schemas.AuditVerifyPublic(
        ok=r.ok, rows=r.rows, first_bad_seq=r.first_bad_seq, reason=r.reason, head_hash=r.head_hash
    )
