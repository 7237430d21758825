"""Shadow and canary reports: recorded with their audit row, read back by the gates."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from stagegate.governance import audit, versions
from stagegate.governance.models import Evaluation
from stagegate.lifecycle.gates import ReportFacts


def record(
    session: Session,
    *,
    model: str,
    version: int,
    kind: str,
    passed: bool,
    reason: str,
    sample_size: int,
    summary: dict[str, Any],
    window_start: datetime,
    actor: str,
) -> Evaluation:
    versions.get_version(session, model, version)
    row = Evaluation(
        model_name=model,
        version=version,
        kind=kind,
        passed=passed,
        reason=reason,
        sample_size=sample_size,
        summary=summary,
        window_start=window_start,
    )
    session.add(row)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=f"evaluation.{kind}",
        entity_type="version",
        entity_id=f"{model}/{version}",
        data={"passed": passed, "reason": reason, "sample_size": sample_size, "summary": summary},
    )
    return row


def latest(session: Session, model: str, version: int) -> dict[str, Evaluation]:
    """The newest report of each kind for the version."""
    rows = session.exec(
        select(Evaluation)
        .where(Evaluation.model_name == model, Evaluation.version == version)
        .order_by(col(Evaluation.created_at), col(Evaluation.id))
    ).all()
    return {row.kind: row for row in rows}  # later rows overwrite earlier ones


def facts(session: Session, model: str, version: int) -> dict[str, ReportFacts]:
    return {
        kind: ReportFacts(kind, row.passed, row.reason)
        for kind, row in latest(session, model, version).items()
    }


def list_for(session: Session, model: str, version: int) -> list[Evaluation]:
    versions.get_version(session, model, version)
    return list(
        session.exec(
            select(Evaluation)
            .where(Evaluation.model_name == model, Evaluation.version == version)
            .order_by(col(Evaluation.created_at).desc(), col(Evaluation.id).desc())
        ).all()
    )
