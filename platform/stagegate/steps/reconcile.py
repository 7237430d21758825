"""Reconcile: catch what events missed (webhooks are at-most-once; emits can fail)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import col, or_, select

from stagegate.db import transaction, utcnow
from stagegate.errors import StagegateError
from stagegate.events.announce import announce_applied
from stagegate.events.sink import EventSink
from stagegate.governance.models import ModelVersion, Transition, TransitionStatus
from stagegate.lifecycle.stages import REGISTRY_ALIAS, Stage
from stagegate.registry.protocol import ModelRegistry, valid_model_name
from stagegate.steps.apply import apply_transition
from stagegate.steps.common import regate
from stagegate.steps.intake import intake

log = logging.getLogger(__name__)

LIVE_STAGES = tuple(REGISTRY_ALIAS)


@dataclass
class ReconcileReport:
    intaken: list[str] = field(default_factory=list)
    approved: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    mirrored: int = 0
    endpoints: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _intake_missed(
    engine: Engine, registry: ModelRegistry, sink: EventSink, report: ReconcileReport
) -> None:
    """Versions the registry has and we never heard of (a lost webhook)."""
    with transaction(engine, read_only=True) as session:
        known = {(v.model_name, v.version) for v in session.exec(select(ModelVersion)).all()}
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


def _reevaluate_pending(engine: Engine, sink: EventSink, report: ReconcileReport) -> None:
    """Pending transitions whose gates may pass now (a slot freed up, a policy changed)."""
    with transaction(engine, read_only=True) as session:
        pending = session.exec(
            select(Transition.id).where(Transition.status == TransitionStatus.pending)
        ).all()
    report.approved.extend(regate(engine, sink, pending))


def _apply_stale(
    engine: Engine,
    registry: ModelRegistry,
    sink: EventSink,
    stale_after_s: float,
    backend: str,
    report: ReconcileReport,
) -> None:
    """Approved transitions nobody applied (a lost event, a dead flow run)."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    with transaction(engine, read_only=True) as session:
        stale = session.exec(
            select(Transition.id).where(
                Transition.status == TransitionStatus.approved, col(Transition.decided_at) < cutoff
            )
        ).all()
    for tid in stale:
        try:
            result = apply_transition(engine, registry, tid, backend=backend)
            report.applied.append(f"{tid}: {result.status}")
            if result.status is TransitionStatus.applied:  # the shadow/canary flows start on it
                announce_applied(
                    sink,
                    transition_id=tid,
                    model=result.model,
                    version=result.version,
                    from_stage=result.from_stage,
                    to_stage=result.to_stage,
                )
        except StagegateError as exc:
            report.errors.append(f"apply {tid}: {exc.detail}")


def _remirror(
    engine: Engine, registry: ModelRegistry, report: ReconcileReport
) -> list[tuple[str, int, Stage]]:
    """Re-assert live stages and anything moved in the last day, in case a mirror write failed
    after its commit (the database stays the truth). Returns what it looked at."""
    since = utcnow() - timedelta(hours=24)
    with transaction(engine, read_only=True) as session:
        rows = [
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
    for name, number, stage in rows:
        try:
            registry.mirror_stage(name, number, stage)
            report.mirrored += 1
        except StagegateError as exc:
            report.errors.append(f"mirror {name}/{number}: {exc.detail}")
    return rows


def reconcile(
    engine: Engine,
    registry: ModelRegistry,
    sink: EventSink,
    *,
    stale_after_s: float,
    sync_endpoint: Callable[[str], object] | None = None,
    backend: str = "none",
) -> ReconcileReport:
    """Catch up in passes; with `sync_endpoint` it also restores each live model's servers
    and route (a crashed model server comes back here)."""
    report = ReconcileReport()
    _intake_missed(engine, registry, sink, report)
    _reevaluate_pending(engine, sink, report)
    _apply_stale(engine, registry, sink, stale_after_s, backend, report)
    looked_at = _remirror(engine, registry, report)
    if sync_endpoint is not None:
        # Models that lost their last live version need their route and servers removed too.
        for name in sorted({name for name, _, _ in looked_at}):
            try:
                sync_endpoint(name)
                report.endpoints.append(name)
            except StagegateError as exc:
                report.errors.append(f"endpoint {name}: {exc.detail}")
    for line in report.errors:
        log.warning("reconcile: %s", line)
    return report
