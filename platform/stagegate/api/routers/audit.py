"""The audit log: read it, verify its chain."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from stagegate.api import schemas
from stagegate.api.deps import SessionDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT
from stagegate.api.strict import StrictRoute
from stagegate.governance import audit

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], route_class=StrictRoute)


@router.get("", responses=responses(401, 422, 503))
def list_audit(
    session: SessionDep,
    _: Viewer,
    entity_id: Annotated[str | None, Query(max_length=200)] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=schemas.MAX_PAGE)] = 50,
) -> schemas.AuditPublic:
    rows = audit.entries(session, entity_id=entity_id, offset=offset, limit=limit)
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
