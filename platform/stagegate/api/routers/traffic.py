"""Traffic policies for routers: every model's published route, from the database, with an ETag."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response

from stagegate.api.deps import SessionDep, require
from stagegate.api.errors import responses
from stagegate.api.strict import StrictRoute
from stagegate.governance import endpoints
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role
from stagegate.serving.policy import RouterConfig

router = APIRouter(prefix="/api/v1/traffic", tags=["serving"], route_class=StrictRoute)

RouterReader = Annotated[Principal, Depends(require(Role.service, Role.admin))]


@router.get(
    "",
    response_model=RouterConfig,
    responses={304: {"description": "Not modified"}, **responses(401, 403, 422, 503)},
)
def traffic(
    session: SessionDep,
    _: RouterReader,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The router config (all models' routes). Routers poll it; unchanged answers are 304."""
    # Validated before serving: a router must never receive a config it would refuse.
    body = RouterConfig.model_validate({"policies": endpoints.routes(session)}).model_dump_json()
    etag = '"' + hashlib.sha256(body.encode()).hexdigest()[:32] + '"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"etag": etag})
    return Response(
        body, media_type="application/json", headers={"etag": etag, "cache-control": "no-cache"}
    )
