"""Drift alarms: opened by a drifting window, acknowledged by a person, read by the gates.

Like everything in governance/, these functions write their audit rows in the caller's
transaction and never commit.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, col, or_, select

from stagegate.errors import ConflictError, NotFoundError, PermissionDenied
from stagegate.governance import audit, versions
from stagegate.governance.models import AlarmStatus, DriftAlarm, Evaluation
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.gates import AlarmFacts
from stagegate.lifecycle.stages import Role

ACKNOWLEDGERS = frozenset({Role.approver, Role.admin})


def open_alarm(session: Session, model: str, version: int) -> DriftAlarm | None:
    return session.exec(
        select(DriftAlarm).where(
            DriftAlarm.model_name == model,
            DriftAlarm.version == version,
            DriftAlarm.status == AlarmStatus.open,
        )
    ).first()


def raise_alarm(
    session: Session, evaluation: Evaluation, drifted: list[str], *, actor: str
) -> tuple[DriftAlarm, bool]:
    """The version's open alarm, with this drifting window attached; (alarm, newly opened).

    The version row is locked first, so two checks racing open one alarm, not two."""
    versions.get_version(session, evaluation.model_name, evaluation.version, lock=True)
    assert evaluation.id is not None
    seen = session.exec(
        select(DriftAlarm).where(
            or_(
                DriftAlarm.evaluation_id == evaluation.id,
                DriftAlarm.last_evaluation_id == evaluation.id,
            )
        )
    ).first()
    if seen is not None:  # this window was acted on already, even if since acknowledged
        return seen, False
    alarm = open_alarm(session, evaluation.model_name, evaluation.version)
    if alarm is not None:
        if alarm.last_evaluation_id != evaluation.id:
            alarm.last_evaluation_id = evaluation.id
            session.add(alarm)
        return alarm, False
    alarm = DriftAlarm(
        model_name=evaluation.model_name,
        version=evaluation.version,
        evaluation_id=evaluation.id,
        last_evaluation_id=evaluation.id,
        drifted_features=drifted,
    )
    session.add(alarm)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action="drift.alarm_opened",
        entity_type="version",
        entity_id=f"{evaluation.model_name}/{evaluation.version}",
        data={"alarm": alarm.id, "evaluation": evaluation.id, "drifted_features": drifted},
    )
    return alarm, True


def get_alarm(session: Session, alarm_id: str, *, lock: bool = False) -> DriftAlarm:
    query = select(DriftAlarm).where(DriftAlarm.id == alarm_id)
    row = session.exec(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFoundError(f"drift alarm {alarm_id} not found")
    return row


def acknowledge(
    session: Session, *, principal: Principal, alarm_id: str, comment: str | None, now: datetime
) -> DriftAlarm:
    """A person has looked: the alarm stops blocking promotions; a new drift opens a new one."""
    if principal.role not in ACKNOWLEDGERS:
        raise PermissionDenied(f"role {principal.role} may not acknowledge drift alarms")
    alarm = get_alarm(session, alarm_id, lock=True)
    if alarm.status is not AlarmStatus.open:
        raise ConflictError(f"drift alarm {alarm_id} is already {alarm.status}")
    alarm.status = AlarmStatus.acknowledged
    alarm.acknowledged_by, alarm.acknowledged_at, alarm.comment = principal.name, now, comment
    session.add(alarm)
    audit.append(
        session,
        actor=principal.name,
        action="drift.alarm_acknowledged",
        entity_type="version",
        entity_id=f"{alarm.model_name}/{alarm.version}",
        data={"alarm": alarm.id, "comment": comment},
    )
    return alarm


def record_action(
    session: Session, alarm: DriftAlarm, action: str, *, actor: str, **data: object
) -> None:
    """One action's outcome, in the audit log beside the alarm's own row."""
    session.add(alarm)
    audit.append(
        session,
        actor=actor,
        action=f"drift.{action}",
        entity_type="version",
        entity_id=f"{alarm.model_name}/{alarm.version}",
        data={"alarm": alarm.id, **data},
    )


def list_for(session: Session, model: str, version: int | None = None) -> list[DriftAlarm]:
    query = select(DriftAlarm).where(DriftAlarm.model_name == model)
    if version is not None:
        query = query.where(DriftAlarm.version == version)
    return list(session.exec(query.order_by(col(DriftAlarm.opened_at).desc())).all())


def facts(session: Session, model: str, version: int) -> AlarmFacts | None:
    alarm = open_alarm(session, model, version)
    if alarm is None:
        return None
    return AlarmFacts(alarm.id, alarm.version, tuple(alarm.drifted_features))
