"""Identities and the MLflow user names linked to them (admin only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from stagegate.api import schemas
from stagegate.api.deps import Admin, SessionDep
from stagegate.api.errors import responses
from stagegate.api.strict import StrictRoute
from stagegate.governance import identities
from stagegate.governance.identities import IdentityInfo

router = APIRouter(prefix="/api/v1/identities", tags=["identities"], route_class=StrictRoute)

IdentityName = Annotated[str, Path(min_length=1, max_length=100)]
MlflowUser = Annotated[str, Path(min_length=1, max_length=200)]


def _public(info: IdentityInfo) -> schemas.IdentityPublic:
    return schemas.IdentityPublic(
        name=info.name, role=info.role, active=info.active, mlflow_users=info.mlflow_users
    )


@router.get("", responses=responses(401, 403, 422, 503))
def list_identities(session: SessionDep, _: Admin) -> schemas.IdentitiesPublic:
    """Every identity that holds or held a token, with its linked MLflow user names."""
    return schemas.IdentitiesPublic(data=[_public(i) for i in identities.list_identities(session)])


@router.put("/{name}/mlflow-users/{mlflow_user}", responses=responses(401, 403, 404, 409, 422, 503))
def link_mlflow_user(
    session: SessionDep, admin: Admin, name: IdentityName, mlflow_user: MlflowUser
) -> schemas.IdentityPublic:
    """Versions whose MLflow author is `mlflow_user` are then `name`'s (idempotent)."""
    identities.link(session, identity=name, mlflow_user=mlflow_user, actor=admin.name)
    answer = _public(identities.get_identity(session, name))  # nothing reads after COMMIT
    session.commit()
    return answer


@router.delete("/{name}/mlflow-users/{mlflow_user}", responses=responses(401, 403, 404, 422, 503))
def unlink_mlflow_user(
    session: SessionDep, admin: Admin, name: IdentityName, mlflow_user: MlflowUser
) -> schemas.IdentityPublic:
    """Remove the link; that MLflow user's versions are unmapped again (see the policy)."""
    identities.unlink(session, identity=name, mlflow_user=mlflow_user, actor=admin.name)
    answer = _public(identities.get_identity(session, name))  # nothing reads after COMMIT
    session.commit()
    return answer
