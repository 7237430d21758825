"""Transitions and their approvals."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from stagegate.api import present, schemas
from stagegate.api.deps import Decider, Requester, SessionDep, StateDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT
from stagegate.api.strict import StrictRoute
from stagegate.db import utcnow
from stagegate.events.announce import announce_if_approved
from stagegate.governance import transitions
from stagegate.governance.models import TransitionStatus

# Write routes read their answer inside the transaction and touch the database no more after
# COMMIT: a connection lost after it would answer 503 for a write that landed. So a 503 means
# nothing was written (tests/test_outages.py cuts the connection at every point of an approval).

router = APIRouter(prefix="/api/v1/transitions", tags=["transitions"], route_class=StrictRoute)

TransitionId = Annotated[str, Path(min_length=1, max_length=64)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 409, 413, 422, 503),
)
def request_transition(
    session: SessionDep, state: StateDep, principal: Requester, body: schemas.TransitionCreate
) -> schemas.TransitionPublic:
    t, _created = transitions.request(
        session,
        principal=principal,
        model=body.model,
        version=body.version,
        to_stage=body.to_stage,
        reason=body.reason,
        now=utcnow(),
    )
    answer = present.transition(session, t, principal)  # read before the commit, see below
    session.commit()
    announce_if_approved(state.sink, t)
    return answer


@router.get("", responses=responses(401, 422, 503))
def list_transitions(
    session: SessionDep,
    principal: Viewer,
    model: Annotated[str | None, Query(max_length=128)] = None,
    status: TransitionStatus | None = None,
    offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=schemas.MAX_PAGE)] = 50,
) -> schemas.TransitionsPublic:
    rows = transitions.list_transitions(
        session, model=model, status=status, offset=offset, limit=limit
    )
    return schemas.TransitionsPublic(
        data=present.transitions_for(session, rows, principal), offset=offset, limit=limit
    )


@router.get("/{transition_id}", responses=responses(401, 404, 422, 503))
def get_transition(
    session: SessionDep, principal: Viewer, transition_id: TransitionId
) -> schemas.TransitionPublic:
    """The transition, with what the caller may decide on it (`allowed_actions`)."""
    t = transitions.get_transition(session, transition_id)
    return present.transition(session, t, principal)


@router.post(
    "/{transition_id}/approvals",
    status_code=status.HTTP_201_CREATED,
    responses=responses(401, 403, 404, 409, 413, 422, 503),
)
def decide(
    session: SessionDep,
    state: StateDep,
    principal: Decider,
    transition_id: TransitionId,
    body: schemas.ApprovalCreate,
) -> schemas.TransitionPublic:
    """Approve or reject. The gates re-run against the champion of this moment."""
    t = transitions.decide(
        session,
        principal=principal,
        transition_id=transition_id,
        decision=body.decision,
        comment=body.comment,
        now=utcnow(),
    )
    answer = present.transition(session, t, principal)  # read before the commit, see below
    session.commit()
    announce_if_approved(state.sink, t)
    return answer
