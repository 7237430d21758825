"""What every step shares."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from stagegate.db import Engine, transaction, utcnow
from stagegate.events.announce import announce_if_approved
from stagegate.events.sink import EventSink
from stagegate.governance import evaluations, transitions, versions
from stagegate.governance.models import Evaluation, TransitionStatus
from stagegate.governance.policies import get_policy
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.policy import Policy
from stagegate.lifecycle.stages import Role, Stage

# The identity steps act under: it requests transitions and appears in the audit log.
SERVICE = Principal("stagegate", Role.service)


def regate(engine: Engine, sink: EventSink, transition_ids: Iterable[str]) -> list[str]:
    """Re-run the gates of pending transitions, one transaction each; announce approvals.

    Returns the ids that became approved (announced or, if the emit failed, left to
    reconcile's stale-approval pass)."""
    approved = []
    for tid in transition_ids:
        with transaction(engine) as session:
            t = transitions.reevaluate(session, transition_id=tid, now=utcnow(), actor=SERVICE.name)
        if t.status is TransitionStatus.approved:
            approved.append(tid)
            announce_if_approved(sink, t)
    return approved


@dataclass(frozen=True)
class EvidenceContext:
    """What a report step reads first: the version as it stands, its policy, the champion it
    is judged against, and the report of this kind already recorded for exactly that."""

    stage: Stage
    digest: str | None
    since: datetime  # when the version entered its stage: the evidence window starts there
    metrics: dict[str, float]
    policy: Policy
    champion_version: int | None
    champion_metrics: dict[str, float]
    recorded: Evaluation | None  # keyed by version, kind, window, digest and champion


def evidence_context(engine: Engine, model: str, version: int, kind: str) -> EvidenceContext:
    with transaction(engine, read_only=True) as session:
        row = versions.get_version(session, model, version)
        champion = versions.holder(session, model, Stage.production)
        champion_version = champion.version if champion else None
        key = evaluations.evidence_key(
            model, version, kind, row.stage_changed_at, row.digest, champion_version
        )
        return EvidenceContext(
            stage=row.stage,
            digest=row.digest,
            since=row.stage_changed_at,
            metrics=dict(row.metrics),
            policy=get_policy(session, model),
            champion_version=champion_version,
            champion_metrics=dict(champion.metrics) if champion else {},
            recorded=evaluations.find(session, key),
        )
