"""Traffic policies for routers: what endpoint sync decided, served with an ETag."""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Response

from stagegate.api.deps import StateDep, require
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role
from stagegate.serving.policy import RouterConfig

router = APIRouter(prefix="/api/v1/traffic", tags=["serving"])

RouterReader = Annotated[Principal, Depends(require(Role.service, Role.admin))]


@router.get("", response_model=RouterConfig)
def traffic(
    state: StateDep,
    _: RouterReader,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The router config (all models' policies). Routers poll it; unchanged answers are 304."""
    path = state.settings.router_file
    body = path.read_bytes() if path.exists() else RouterConfig().model_dump_json().encode()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    if if_none_match == etag:
        return Response(status_code=304, headers={"etag": etag})
    # Validate before serving: a router must never receive a config it would refuse.
    config = RouterConfig.model_validate_json(body)
    return Response(
        config.model_dump_json(),
        media_type="application/json",
        headers={"etag": etag, "cache-control": "no-cache"},
    )
