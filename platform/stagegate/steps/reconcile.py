"""Reconcile: catch what events missed (webhooks are at-most-once; emits can fail)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import col, or_, select

from stagegate.db import transaction, utcnow
from stagegate.errors import StagegateError
from stagegate.events.announce import announce_if_approved
from stagegate.events.sink import EventSink
from stagegate.governance import transitions
from stagegate.governance.models import ModelVersion, Transition, TransitionStatus
from stagegate.lifecycle.stages import REGISTRY_ALIAS
from stagegate.registry.protocol import ModelRegistry, valid_model_name
from stagegate.steps.apply import apply_transition
from stagegate.steps.common import SERVICE
from stagegate.steps.intake import intake

log = logging.getLogger(__name__)

LIVE_STAGES = tuple(REGISTRY_ALIAS)


@dataclass
class ReconcileReport:
    intaken: list[str] = field(default_factory=list)
    approved: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    mirrored: int = 0
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def reconcile(
    engine: Engine, registry: ModelRegistry, sink: EventSink, *, stale_after_s: float
) -> ReconcileReport:
    report = ReconcileReport()
    with transaction(engine, read_only=True) as session:
        known = {(v.model_name, v.version) for v in session.exec(select(ModelVersion)).all()}
    # 1. Versions the registry has and we never heard of.
    for ref in registry.list_versions():
        if (ref.name, ref.version) in known:
            continue
        if not valid_model_name(ref.name):  # MLflow allows names Stagegate refuses
            report.skipped.append(f"{ref.name}/{ref.version}: unsupported model name")
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
    # 4. The registry mirror: re-assert the live stages and anything moved recently, in case
    #    a mirror write failed after its commit (the database stays the truth).
    since = utcnow() - timedelta(hours=24)
    with transaction(engine, read_only=True) as session:
        to_mirror = [
            (v.model_name, v.version, v.stage)
            for v in session.exec(
                select(ModelVersion).where(
                    or_(
                        col(ModelVersion.stage).in_(LIVE_STAGES),
                        col(ModelVersion.stage_changed_at) >= since,
                    )
                )
            ).all()
        ]
    for name, number, stage in to_mirror:
        try:
            registry.mirror_stage(name, number, stage)
            report.mirrored += 1
        except StagegateError as exc:
            report.errors.append(f"mirror {name}/{number}: {exc.detail}")
    for line in report.errors:
        log.warning("reconcile: %s", line)
    return report
