"""The looks of canary A/B experiments: recorded as the flow takes them, read for the chart."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from stagegate.governance import versions
from stagegate.governance.models import ExperimentLook

# A flow looks every few seconds for days; a look that saw no new sample and decided nothing
# adds nothing to the chart, so it is not stored.
_SAME_FIELDS = ("action", "n_treatment", "n_control")


def last_look(session: Session, model: str, version: int, window_start: datetime) -> Any:
    return session.exec(
        select(ExperimentLook)
        .where(
            ExperimentLook.model_name == model,
            ExperimentLook.version == version,
            ExperimentLook.window_start == window_start,
        )
        .order_by(col(ExperimentLook.id).desc())
        .limit(1)
    ).first()


def record_look(session: Session, look: ExperimentLook) -> bool:
    """Store the look unless it repeats the previous one; True if stored."""
    previous = last_look(session, look.model_name, look.version, look.window_start)
    if previous is not None and all(getattr(previous, f) == getattr(look, f) for f in _SAME_FIELDS):
        return False
    session.add(look)
    session.flush()
    return True


def looks_for(
    session: Session, model: str, version: int, *, limit: int = 2000
) -> list[ExperimentLook]:
    """The version's looks in time order, from its latest experiment (its last canary start).

    Beyond `limit` looks, an even sample of them is returned, always with the first and last.
    """
    versions.get_version(session, model, version)
    latest = session.exec(
        select(ExperimentLook.window_start)
        .where(ExperimentLook.model_name == model, ExperimentLook.version == version)
        .order_by(col(ExperimentLook.window_start).desc())
        .limit(1)
    ).first()
    if latest is None:
        return []
    rows = list(
        session.exec(
            select(ExperimentLook)
            .where(
                ExperimentLook.model_name == model,
                ExperimentLook.version == version,
                ExperimentLook.window_start == latest,
            )
            .order_by(col(ExperimentLook.id))
        ).all()
    )
    if len(rows) <= limit:
        return rows
    step = (len(rows) - 1) / (limit - 1)
    return [rows[round(i * step)] for i in range(limit)]
