"""Reconcile: catch what events missed (webhooks are at-most-once; emits can fail)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from stagegate.db import transaction, utcnow
from stagegate.errors import StagegateError
from stagegate.events.announce import announce_if_approved
from stagegate.events.sink import EventSink
from stagegate.governance import transitions
from stagegate.governance.models import ModelVersion, Transition, TransitionStatus
from stagegate.registry.protocol import ModelRegistry
from stagegate.steps.apply import apply_transition
from stagegate.steps.common import SERVICE
from stagegate.steps.intake import intake

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    intaken: list[str] = field(default_factory=list)
    approved: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def reconcile(
    engine: Engine, registry: ModelRegistry, sink: EventSink, *, stale_after_s: float
) -> ReconcileReport:
    report = ReconcileReport()
    with transaction(engine) as session:
        known = {(v.model_name, v.version) for v in session.exec(select(ModelVersion)).all()}
    # 1. Versions the registry has and we never heard of.
    for ref in registry.list_versions():
        if (ref.name, ref.version) in known:
            continue
        try:
            intake(engine, registry, sink, ref.name, ref.version)
            report.intaken.append(f"{ref.name}/{ref.version}")
        except StagegateError as exc:
            report.errors.append(f"intake {ref.name}/{ref.version}: {exc.detail}")

    # 2. Pending transitions whose gates may pass now (a slot freed up, a policy changed).
    with transaction(engine) as session:
        pending = session.exec(
            select(Transition.id).where(Transition.status == TransitionStatus.pending)
        ).all()
    for tid in pending:
        with transaction(engine) as session:
            t = transitions.reevaluate(session, transition_id=tid, now=utcnow(), actor=SERVICE.name)
        if t.status is TransitionStatus.approved:
            report.approved.append(tid)
            announce_if_approved(sink, t)

    # 3. Approved transitions nobody applied (a lost event, a dead flow run).
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    with transaction(engine) as session:
        stale = session.exec(
            select(Transition.id).where(
                Transition.status == TransitionStatus.approved, col(Transition.decided_at) < cutoff
            )
        ).all()
    for tid in stale:
        try:
            result = apply_transition(engine, registry, tid)
            report.applied.append(f"{tid}: {result.status}")
        except StagegateError as exc:
            report.errors.append(f"apply {tid}: {exc.detail}")
    for line in report.errors:
        log.warning("reconcile: %s", line)
    return report
