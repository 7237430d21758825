"""A/B experiments: each canary's looks over time and the decision, for the UI's chart."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from stagegate.api.deps import SessionDep, Viewer
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT
from stagegate.api.strict import StrictRoute
from stagegate.governance import evaluations, experiments
from stagegate.governance.models import Evaluation, ExperimentLook

router = APIRouter(prefix="/api/v1", tags=["experiments"], route_class=StrictRoute)

ModelName = Annotated[str, Path(min_length=1, max_length=128)]
VersionNo = Annotated[int, Path(ge=1, le=MAX_INT)]


class LookPublic(BaseModel):
    at: datetime
    action: str = Field(description="continue, promote or rollback.")
    n_treatment: int = Field(description="Units of the canary so far.")
    n_control: int = Field(description="Units of the champion so far.")
    estimate: float | None = Field(description="Canary mean minus champion mean.")
    lower: float | None = Field(description="Always-valid interval; null while unbounded.")
    upper: float | None
    p_value: float | None = Field(description="Always-valid p-value of no difference.")
    guardrails: dict[str, Any] = Field(description="Per guardrail: effect and interval.")


class DecisionPublic(BaseModel):
    evaluation_id: int
    action: str
    passed: bool
    reason: str
    digest: str | None = Field(description="The artifact the experiment judged.")
    champion_version: int | None = Field(description="The champion it was compared with.")
    breached: list[str]
    decided_at: datetime
    summary: dict[str, Any]


class ExperimentPublic(BaseModel):
    model: str
    version: int
    started_at: datetime | None = Field(description="When the canary (the experiment) began.")
    digest: str | None
    champion_version: int | None
    looks: list[LookPublic] = Field(description="Oldest first; at most 2,000, evenly sampled.")
    decision: DecisionPublic | None = Field(description="Null while the test continues.")
    offline_gain: dict[str, Any] | None = Field(
        description="The run metric's gain over the champion's, offline."
    )
    online_gain: dict[str, Any] | None = Field(description="The A/B's effect, online.")


def _look(row: ExperimentLook) -> LookPublic:
    primary = row.detail.get("primary", {})
    return LookPublic(
        at=row.at,
        action=row.action,
        n_treatment=row.n_treatment,
        n_control=row.n_control,
        estimate=row.estimate,
        lower=row.lower,
        upper=row.upper,
        p_value=primary.get("p_value"),
        guardrails=row.detail.get("guardrails", {}),
    )


def _decision(e: Evaluation) -> DecisionPublic:
    return DecisionPublic(
        evaluation_id=e.id or 0,
        action=str(e.summary.get("action", "promote" if e.passed else "rollback")),
        passed=e.passed,
        reason=e.reason,
        digest=e.digest,
        champion_version=e.champion_version,
        breached=[str(b) for b in e.summary.get("breached", [])],
        decided_at=e.created_at,
        summary=e.summary,
    )


@router.get("/models/{name}/versions/{version}/experiment", responses=responses(401, 404, 422, 503))
def get_experiment(
    session: SessionDep, _: Viewer, name: ModelName, version: VersionNo
) -> ExperimentPublic:
    """The version's latest A/B experiment: samples, effect and interval at each look, and
    the decision once there is one."""
    looks = experiments.looks_for(session, name, version)
    started = looks[0].window_start if looks else None
    decided = next(
        (
            e
            for e in evaluations.list_for(session, name, version)
            if e.kind == "experiment" and (started is None or e.window_start == started)
        ),
        None,
    )
    last = looks[-1] if looks else None
    source: dict[str, Any] = decided.summary if decided else (last.detail if last else {})
    return ExperimentPublic(
        model=name,
        version=version,
        started_at=started or (decided.window_start if decided else None),
        digest=last.digest if last else (decided.digest if decided else None),
        champion_version=(
            last.champion_version if last else (decided.champion_version if decided else None)
        ),
        looks=[_look(r) for r in looks],
        decision=_decision(decided) if decided else None,
        offline_gain=source.get("offline_gain"),
        online_gain=source.get("online_gain"),
    )
