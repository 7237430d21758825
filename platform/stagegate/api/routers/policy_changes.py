"""Policy changes: every change of a policy, and the second admin's decision on weakening ones."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from stagegate.api import present, schemas
from stagegate.api.deps import Admin, SessionDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT
from stagegate.api.strict import StrictRoute
from stagegate.governance import policies
from stagegate.governance.models import PolicyChangeStatus

router = APIRouter(
    prefix="/api/v1/policy-changes", tags=["policy changes"], route_class=StrictRoute
)

ChangeId = Annotated[str, Path(min_length=1, max_length=64)]


@router.get("", responses=responses(401, 422, 503))
def list_changes(
    session: SessionDep,
    _: Viewer,
    model: Annotated[str | None, Query(max_length=128)] = None,
    status: PolicyChangeStatus | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=schemas.MAX_PAGE)] = 50,
) -> schemas.PolicyChangesPublic:
    """Policy changes, newest first: applied, pending a second admin, or rejected."""
    rows = policies.list_changes(session, model=model, status=status, offset=offset, limit=limit)
    return schemas.PolicyChangesPublic(
        data=[present.policy_change(c) for c in rows], offset=offset, limit=limit
    )


@router.get("/{change_id}", responses=responses(401, 404, 422, 503))
def get_change(session: SessionDep, _: Viewer, change_id: ChangeId) -> schemas.PolicyChangePublic:
    return present.policy_change(policies.get_change(session, change_id))


@router.post(
    "/{change_id}/approvals",
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 409, 413, 422, 503),
)
def decide_change(
    session: SessionDep, admin: Admin, change_id: ChangeId, body: schemas.ApprovalCreate
) -> schemas.PolicyChangePublic:
    """A second admin approves (the policy applies now) or rejects a pending change; its
    proposer may only reject (withdraw) it."""
    change = policies.decide_change(
        session,
        change_id=change_id,
        actor=admin.name,
        decision=body.decision,
        comment=body.comment,
    )
    session.commit()
    return present.policy_change(change)
