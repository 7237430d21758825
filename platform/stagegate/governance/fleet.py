"""The fleet at a glance: every model's live versions, split, pending approvals and drift, and
how the platform performs (lead time to production, versions rejected and why).

Each figure is one grouped query over all models, so the page costs a fixed number of
queries however many models there are (tests/test_api_ui_support.py counts them).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlmodel import Session, col, func, select

from stagegate.governance.models import (
    AlarmStatus,
    Approval,
    DriftAlarm,
    Endpoint,
    Evaluation,
    ModelVersion,
    RegisteredModel,
    Transition,
    TransitionStatus,
)
from stagegate.lifecycle.endpoint import EndpointSpec
from stagegate.lifecycle.stages import DEPLOYMENT_ROLE, LIVE, DeploymentRole, Stage

TOP_REASONS = 20  # the fleet page shows the most frequent reasons, not every one
NO_REASON = "(no reason given)"


@dataclass(frozen=True)
class Holder:
    version: int
    since: datetime


@dataclass(frozen=True)
class DriftStatus:
    status: Literal["ok", "drift", "unchecked"]
    open_alarms: int
    last_checked: datetime | None


@dataclass(frozen=True)
class ModelFleet:
    name: str
    versions: int
    holders: dict[DeploymentRole, Holder]
    challenger_weight: float
    shadow_fraction: float
    pending_approvals: int
    drift: DriftStatus


@dataclass(frozen=True)
class LeadTime:
    median: float | None
    p90: float | None
    samples: int


@dataclass(frozen=True)
class Rejections:
    share: float | None
    versions: int
    reasons: list[tuple[str, int]]


@dataclass(frozen=True)
class Fleet:
    models: list[ModelFleet]
    pending_approvals: int
    lead_time: LeadTime
    rejected: Rejections


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile with linear interpolation between order statistics (NumPy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _counts(session: Session, name: Any, where: Any = None) -> dict[str, int]:
    """Rows per model name: `select name, count(*) ... group by name`, in one query."""
    query = select(name, func.count())
    if where is not None:
        query = query.where(where)
    return {str(n): int(c) for n, c in session.exec(query.group_by(name)).all()}


def lead_time(session: Session) -> LeadTime:
    """Seconds from registration to the version's first applied move into production."""
    first_production = (
        select(
            ModelVersion.registered_at,
            func.min(Transition.applied_at),
        )
        .join(
            Transition,
            (col(Transition.model_name) == col(ModelVersion.model_name))
            & (col(Transition.version) == col(ModelVersion.version)),
        )
        .where(
            Transition.to_stage == Stage.production,
            Transition.status == TransitionStatus.applied,
            col(Transition.applied_at).is_not(None),
        )
        .group_by(col(ModelVersion.id), col(ModelVersion.registered_at))
    )
    samples = []
    for registered, promoted in session.exec(first_production).all():
        if promoted is not None:  # min() keeps the column's type: an aware UTC datetime
            samples.append(max(0.0, (promoted - registered).total_seconds()))
    return LeadTime(quantile(samples, 0.5), quantile(samples, 0.9), len(samples))


def rejections(session: Session, total_versions: int) -> Rejections:
    """Versions turned down: moved to `rejected` (the move's reason), or a transition of
    theirs rejected by a person (the comment, else the status reason)."""
    events: list[tuple[str, int, str]] = []
    for name, version, reason in session.exec(
        select(Transition.model_name, Transition.version, Transition.reason).where(
            Transition.to_stage == Stage.rejected, Transition.status == TransitionStatus.applied
        )
    ).all():
        events.append((name, version, reason))
    for name, version, comment in session.exec(
        select(Transition.model_name, Transition.version, Approval.comment)
        .join(Approval, col(Approval.transition_id) == col(Transition.id))
        .where(Approval.decision == "reject")
    ).all():
        events.append((name, version, comment or ""))
    rejected = {(name, version) for name, version, _ in events}
    counts = Counter(" ".join(reason.split()) or NO_REASON for _, _, reason in events)
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_REASONS]
    share = len(rejected) / total_versions if total_versions else None
    return Rejections(share, len(rejected), top)


def fleet(session: Session) -> Fleet:
    names = list(session.exec(select(RegisteredModel.name).order_by(col(RegisteredModel.name))))
    counts = _counts(session, col(ModelVersion.model_name))
    holders: dict[str, dict[DeploymentRole, Holder]] = {}
    for v in session.exec(
        select(ModelVersion).where(col(ModelVersion.stage).in_(sorted(LIVE)))
    ).all():
        holders.setdefault(v.model_name, {})[DEPLOYMENT_ROLE[v.stage]] = Holder(
            v.version, v.stage_changed_at
        )
    specs = {
        e.model_name: EndpointSpec.model_validate(e.spec)
        for e in session.exec(select(Endpoint)).all()
    }
    pending = _counts(
        session, col(Transition.model_name), col(Transition.status) == TransitionStatus.pending
    )
    alarms = _counts(
        session, col(DriftAlarm.model_name), col(DriftAlarm.status) == AlarmStatus.open
    )
    checked = {
        name: at
        for name, at in session.exec(
            select(Evaluation.model_name, func.max(Evaluation.created_at))
            .where(Evaluation.kind == "drift")
            .group_by(col(Evaluation.model_name))
        ).all()
        if at is not None
    }
    models = []
    for name in names:
        spec = specs.get(name, EndpointSpec())
        open_alarms = alarms.get(name, 0)
        last = checked.get(name)
        status: Literal["ok", "drift", "unchecked"] = (
            "drift" if open_alarms else ("ok" if last is not None else "unchecked")
        )
        models.append(
            ModelFleet(
                name=name,
                versions=counts.get(name, 0),
                holders=holders.get(name, {}),
                challenger_weight=spec.challenger_weight,
                shadow_fraction=spec.shadow_fraction,
                pending_approvals=pending.get(name, 0),
                drift=DriftStatus(status, open_alarms, last),
            )
        )
    return Fleet(
        models=models,
        pending_approvals=sum(pending.values()),
        lead_time=lead_time(session),
        rejected=rejections(session, sum(counts.values())),
    )
