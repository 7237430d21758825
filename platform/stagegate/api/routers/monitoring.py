"""Drift: each version's checks over time, their HTML reports, and the alarms they opened."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, Field

from stagegate import reports
from stagegate.api import present
from stagegate.api.deps import SessionDep, StateDep, Viewer, require
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT
from stagegate.api.strict import StrictRoute
from stagegate.db import utcnow
from stagegate.errors import NotFoundError
from stagegate.governance import alarms, evaluations
from stagegate.governance.models import DriftAlarm, Evaluation
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role

router = APIRouter(prefix="/api/v1", tags=["monitoring"], route_class=StrictRoute)

ModelName = Annotated[str, Path(min_length=1, max_length=128)]
VersionNo = Annotated[int, Path(ge=1, le=MAX_INT)]
Acknowledger = Annotated[Principal, Depends(require(Role.approver, Role.admin))]

# Evidently's page runs its own scripts; sandboxed, they run without this origin's cookies,
# storage or API, so a report can never act as the person reading it.
REPORT_HEADERS = {
    "Content-Security-Policy": "sandbox allow-scripts",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "private, max-age=3600",
}


class ColumnScore(BaseModel):
    column: str
    kind: str | None
    test: str | None
    threshold: float | None
    score: float | None
    drifted: bool
    verdict: str
    reason: str | None = None


class DriftCheckPublic(BaseModel):
    id: int
    verdict: str = Field(description="ok, drift, insufficient data or no reference.")
    reason: str
    window_start: datetime
    window_end: datetime | None
    sample_size: int = Field(description="Logged rows in the window.")
    digest: str | None = Field(description="The artifact whose traffic was checked.")
    drifted_features: list[str]
    columns: list[ColumnScore] = Field(description="Per-feature test, score and verdict.")
    prediction: ColumnScore | None
    report_url: str | None = Field(description="Evidently's HTML report, when one was stored.")
    created_at: datetime


class DriftAlarmPublic(BaseModel):
    id: str
    model: str
    version: int
    status: str
    opened_at: datetime
    drifted_features: list[str]
    evaluation_id: int
    last_evaluation_id: int
    alert_status: str | None
    alert_attempts: int
    rollback_transition_id: str | None
    event_emitted: bool
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    comment: str | None


class DriftHistoryPublic(BaseModel):
    model: str
    version: int
    checks: list[DriftCheckPublic] = Field(description="Newest first.")
    alarms: list[DriftAlarmPublic] = Field(description="Newest first.")


class AcknowledgeBody(BaseModel):
    comment: str | None = Field(default=None, max_length=2000)


def _score(raw: dict[str, Any] | None) -> ColumnScore | None:
    return None if raw is None else ColumnScore.model_validate(raw, strict=False)


def drift_check(e: Evaluation) -> DriftCheckPublic:
    s = e.summary
    return DriftCheckPublic(
        id=e.id or 0,
        verdict=str(s.get("verdict", "no reference")),
        reason=e.reason,
        window_start=e.window_start,
        window_end=e.window_end,
        sample_size=e.sample_size,
        digest=e.digest,
        drifted_features=list(s.get("drifted_features", [])),
        columns=[c for c in map(_score, s.get("columns", [])) if c is not None],
        prediction=_score(s.get("prediction")),
        report_url=present.report_url(e),
        created_at=e.created_at,
    )


def drift_alarm(a: DriftAlarm) -> DriftAlarmPublic:
    return DriftAlarmPublic(
        id=a.id,
        model=a.model_name,
        version=a.version,
        status=a.status,
        opened_at=a.opened_at,
        drifted_features=a.drifted_features,
        evaluation_id=a.evaluation_id,
        last_evaluation_id=a.last_evaluation_id,
        alert_status=a.alert_status,
        alert_attempts=a.alert_attempts,
        rollback_transition_id=a.rollback_transition_id,
        event_emitted=a.event_emitted_at is not None,
        acknowledged_by=a.acknowledged_by,
        acknowledged_at=a.acknowledged_at,
        comment=a.comment,
    )


@router.get("/models/{name}/versions/{version}/drift", responses=responses(401, 404, 422, 503))
def get_drift(
    session: SessionDep, _: Viewer, name: ModelName, version: VersionNo
) -> DriftHistoryPublic:
    """The version's drift checks over time with per-feature scores, and its alarms."""
    checks = [e for e in evaluations.list_for(session, name, version) if e.kind == "drift"]
    return DriftHistoryPublic(
        model=name,
        version=version,
        checks=[drift_check(e) for e in checks],
        alarms=[drift_alarm(a) for a in alarms.list_for(session, name, version)],
    )


@router.get(
    "/reports/{evaluation_id}",
    response_class=Response,
    responses={
        200: {
            "content": {"text/html": {"schema": {"type": "string"}}},
            "description": "Evidently's HTML report.",
        },
        **responses(401, 404, 422, 503),
    },
)
def get_report(
    session: SessionDep,
    state: StateDep,
    _: Viewer,
    evaluation_id: Annotated[int, Path(ge=1, le=MAX_INT)],
) -> Response:
    """The HTML report a drift check stored, if its file is still the one it wrote."""
    e = session.get(Evaluation, evaluation_id)
    stored = e.summary.get("report") if e is not None else None
    if not isinstance(stored, dict):
        raise NotFoundError(f"evaluation {evaluation_id} has no stored report")
    html = reports.load(state.settings.inference_log_url, stored["path"], stored["sha256"])
    return Response(html, media_type="text/html; charset=utf-8", headers=REPORT_HEADERS)


@router.post(
    "/drift-alarms/{alarm_id}/acknowledge", responses=responses(401, 403, 404, 409, 413, 422, 503)
)
def acknowledge_alarm(
    session: SessionDep,
    principal: Acknowledger,
    alarm_id: Annotated[str, Path(min_length=1, max_length=32)],
    body: AcknowledgeBody,
) -> DriftAlarmPublic:
    """A person has looked at the drift (approver or admin). The alarm stops blocking
    promotions; drift seen after this opens a new alarm."""
    alarm = alarms.acknowledge(
        session, principal=principal, alarm_id=alarm_id, comment=body.comment, now=utcnow()
    )
    session.commit()
    return drift_alarm(alarm)
