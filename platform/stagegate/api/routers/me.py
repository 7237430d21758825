"""Who the caller is: their identity, role and linked MLflow names (for the UI's header)."""

from __future__ import annotations

from fastapi import APIRouter

from stagegate.api import schemas
from stagegate.api.deps import SessionDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.strict import StrictRoute
from stagegate.governance import identities

router = APIRouter(prefix="/api/v1/me", tags=["me"], route_class=StrictRoute)


@router.get("", responses=responses(401, 422, 503))
def get_me(session: SessionDep, principal: Viewer) -> schemas.MePublic:
    """The caller's identity and role, the MLflow user names linked to it (the versions it
    authored, which it may not approve), and when this call's token expires."""
    return schemas.MePublic(
        name=principal.name,
        role=principal.role,
        mlflow_users=identities.linked_users(session, principal.name),
        expires_at=principal.expires_at,
    )
