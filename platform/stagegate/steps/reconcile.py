"""Reconcile: catch what events missed (webhooks are at-most-once; emits can fail)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from stagegate.db import Engine, transaction, utcnow
from stagegate.errors import StagegateError
from stagegate.events.sink import EventSink
from stagegate.governance import endpoints, transitions, versions
from stagegate.lifecycle.stages import Stage
from stagegate.registry.protocol import ModelRegistry, valid_model_name
from stagegate.steps.apply import apply_transition
from stagegate.steps.common import regate
from stagegate.steps.converge import DataPlane, converge
from stagegate.steps.evaluate import KIND, evaluate
from stagegate.steps.intake import intake
from stagegate.steps.offpolicy import evaluate_candidate

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    intaken: list[str] = field(default_factory=list)
    approved: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    mirrored: int = 0
    endpoints: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _intake_missed(
    engine: Engine, registry: ModelRegistry, sink: EventSink, report: ReconcileReport
) -> None:
    """Versions the registry has and we never heard of (a lost webhook)."""
    with transaction(engine, read_only=True) as session:
        known = versions.known_versions(session)
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
        pending = transitions.pending_ids(session)
    report.approved.extend(regate(engine, sink, pending))


def _apply_stale(
    engine: Engine,
    registry: ModelRegistry,
    stale_after_s: float,
    backend: str,
    report: ReconcileReport,
) -> None:
    """Approved transitions nobody applied (a lost event, a dead flow run). Their
    announcement comes from the converge pass, once the endpoint serves them."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    with transaction(engine, read_only=True) as session:
        stale = transitions.approved_before(session, cutoff)
    for tid in stale:
        try:
            result = apply_transition(engine, registry, tid, backend=backend)
            report.applied.append(f"{tid}: {result.status}")
        except StagegateError as exc:
            report.errors.append(f"apply {tid}: {exc.detail}")


def _remirror(engine: Engine, registry: ModelRegistry, report: ReconcileReport) -> None:
    """Re-assert live stages and anything moved in the last day, in case a mirror write failed
    after its commit (the database stays the truth)."""
    since = utcnow() - timedelta(hours=24)
    with transaction(engine, read_only=True) as session:
        rows = versions.live_or_moved_since(session, since)
    for name, number, stage in rows:
        try:
            registry.mirror_stage(name, number, stage)
            report.mirrored += 1
        except StagegateError as exc:
            report.errors.append(f"mirror {name}/{number}: {exc.detail}")


def _converge_all(
    engine: Engine, sink: EventSink, plane: DataPlane, report: ReconcileReport
) -> None:
    """Every model that is live, behind its desired generation, or owes an announcement:
    crashed servers come back, lost `applied` events go out, dropped models lose their route."""
    with transaction(engine, read_only=True) as session:
        models = endpoints.to_converge(session)
    for name in models:
        try:
            converge(engine, sink, plane, name)
            report.endpoints.append(name)
        except StagegateError as exc:
            report.errors.append(f"endpoint {name}: {exc.detail}")


def _evaluate_stages(
    engine: Engine, sink: EventSink, log_url: str, report: ReconcileReport
) -> None:
    """Decide the reports of versions in shadow or canary whose flow died, never started, or
    whose evidence no longer applies (a new champion). Keyed: a decided report is a no-op."""
    with transaction(engine, read_only=True) as session:
        evaluating = versions.in_stages(session, list(KIND))
    for name, number in evaluating:
        try:
            result = evaluate(engine, sink, log_url, name, number)
        except StagegateError as exc:
            report.errors.append(f"evaluate {name}/{number}: {exc.detail}")
            continue
        state = ("passed" if result.passed else "failed") if result.decided else "waiting"
        report.evaluated.append(f"{name}/{number}: {result.kind} {state}")


def _evaluate_candidates(
    engine: Engine, registry: ModelRegistry, sink: EventSink, log_url: str, report: ReconcileReport
) -> None:
    """Decide the off-policy reports of candidates whose intake flow died before it did."""
    with transaction(engine, read_only=True) as session:
        candidates = versions.in_stages(session, [Stage.candidate])
    for name, number in candidates:
        try:
            result = evaluate_candidate(engine, registry, sink, log_url, name, number)
        except StagegateError as exc:
            report.errors.append(f"off-policy {name}/{number}: {exc.detail}")
            continue
        if result.decided:
            report.evaluated.append(f"{name}/{number}: offpolicy {result.verdict}")


def reconcile(
    engine: Engine,
    registry: ModelRegistry,
    sink: EventSink,
    plane: DataPlane,
    *,
    stale_after_s: float,
) -> ReconcileReport:
    """Catch up in passes, ending with `converge` for every model that needs it."""
    report = ReconcileReport()
    _intake_missed(engine, registry, sink, report)
    # Evidence before decisions, decisions before actions: a report whose flow died is
    # decided, its waiting transitions approved and those applied, all in this one pass.
    if plane.log_url is not None:
        _evaluate_candidates(engine, registry, sink, plane.log_url, report)
        _evaluate_stages(engine, sink, plane.log_url, report)
    _reevaluate_pending(engine, sink, report)
    _apply_stale(engine, registry, stale_after_s, plane.backend.name, report)
    _remirror(engine, registry, report)
    _converge_all(engine, sink, plane, report)
    for line in report.errors:
        log.warning("reconcile: %s", line)
    return report
