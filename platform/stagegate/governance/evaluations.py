"""Shadow and canary reports: recorded with their audit row, read back by the gates.

Each is bound to the digest it judged and the champion it was compared with, and keyed by
both and its window, so the same evidence is recorded once however often a flow re-runs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from stagegate.governance import audit, versions
from stagegate.governance.models import Evaluation
from stagegate.lifecycle.gates import ReportFacts


def evidence_key(
    model: str,
    version: int,
    kind: str,
    window_start: datetime,
    digest: str | None,
    champion_version: int | None,
) -> str:
    """What makes two reports the same evidence: one version, window, artifact and champion."""
    champion = "none" if champion_version is None else str(champion_version)
    return f"{kind}:{model}:{version}:{window_start.isoformat()}:{digest or '-'}:{champion}"


def find(session: Session, key: str) -> Evaluation | None:
    return session.exec(select(Evaluation).where(Evaluation.evidence_key == key)).first()


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
    champion_version: int | None = None,
    window_end: datetime | None = None,
) -> Evaluation:
    """Record a report for the version's current digest; the same evidence twice is one row."""
    row_version = versions.get_version(session, model, version)
    key = evidence_key(model, version, kind, window_start, row_version.digest, champion_version)
    existing = find(session, key)
    if existing is not None:
        return existing
    row = Evaluation(
        model_name=model,
        version=version,
        kind=kind,
        passed=passed,
        reason=reason,
        sample_size=sample_size,
        summary=summary,
        window_start=window_start,
        window_end=window_end,
        evidence_key=key,
        digest=row_version.digest,
        champion_version=champion_version,
    )
    session.add(row)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action=f"evaluation.{kind}",
        entity_type="version",
        entity_id=f"{model}/{version}",
        data={
            "passed": passed,
            "reason": reason,
            "sample_size": sample_size,
            "summary": summary,
            "digest": row_version.digest,
            "champion_version": champion_version,
        },
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
        kind: ReportFacts(
            kind,
            row.passed,
            row.reason,
            row.digest,
            row.champion_version,
            breached=tuple(str(b) for b in row.summary.get("breached", ())),
        )
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
