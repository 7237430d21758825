"""Liveness and readiness: public, so probes need no token; they reveal nothing else."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from stagegate.api.deps import SessionDep
from stagegate.api.errors import responses
from stagegate.api.strict import StrictRoute

router = APIRouter(prefix="/api", tags=["health"], route_class=StrictRoute)

PUBLIC_PATHS = frozenset({"/api/health"})


@router.get("/health", responses=responses(422, 503))
def health(session: SessionDep) -> dict[str, str]:
    session.execute(text("SELECT 1"))
    return {"status": "ok"}
