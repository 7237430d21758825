"""The drift check: one version's logged traffic in one window against its training frame.

Each check records one `drift` evaluation, keyed by version, digest and window, so checking
the same window twice is a no-op. A drifting window opens (or joins) the version's alarm,
and the policy's actions run once per alarm: each records its outcome on the alarm, so a
re-run after a crash resumes with the actions not yet done.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import pyarrow as pa  # type: ignore[import-untyped]

from stagegate import reports
from stagegate.db import Engine, transaction, utcnow
from stagegate.errors import ConflictError, NoReference, TransitionRejected
from stagegate.events.alert import Attempt, send_alert
from stagegate.events.announce import announce_if_approved
from stagegate.events.sink import EventSink, OutEvent, model_resource
from stagegate.governance import alarms, evaluations, transitions, versions
from stagegate.governance.models import AlarmStatus, DriftAlarm, Evaluation
from stagegate.governance.policies import get_policy
from stagegate.lifecycle.policy import DriftCriteria
from stagegate.lifecycle.stages import LIVE, Stage
from stagegate.monitoring.check import check
from stagegate.monitoring.results import DRIFT, INSUFFICIENT, OK, DriftReport
from stagegate.serving.inference_log.features import read_features
from stagegate.serving.inference_log.format import loads
from stagegate.serving.inference_log.labels import read_labels
from stagegate.settings import AlertSettings
from stagegate.steps.common import SERVICE

log = logging.getLogger(__name__)

KIND = "drift"
NO_REFERENCE = "no reference"
DRIFT_EVENT = "stagegate.model.drift_detected"

ReadCurrent = Callable[[str, int, datetime, datetime, DriftCriteria], pa.Table]
LoadReference = Callable[[str, int], pa.Table]


@dataclass(frozen=True)
class Monitor:
    """What a check needs from outside: the database, Prefect, the log and the registry."""

    engine: Engine
    sink: EventSink
    log_url: str
    load_reference: LoadReference
    alerts: AlertSettings = field(default_factory=AlertSettings)
    read_current: ReadCurrent | None = None  # None: the inference log's typed features
    api_url: str | None = None  # report links in alerts and events


@dataclass
class DriftOutcome:
    model: str
    version: int
    verdict: str  # ok | drift | insufficient data | no reference
    reason: str
    window_start: datetime
    window_end: datetime
    evaluation_id: int | None = None
    drifted_features: list[str] = field(default_factory=list)
    report_url: str | None = None
    recorded: bool = False  # False: this window was already checked
    alarm_id: str | None = None
    actions: dict[str, str] = field(default_factory=dict)


def window(criteria: DriftCriteria, now: datetime, *, aligned: bool) -> tuple[datetime, datetime]:
    """[start, end) of the window to check. Aligned windows end on a multiple of
    `interval_s` since the epoch, so every check within one interval checks the same one."""
    end = now.astimezone(UTC)
    if aligned:
        step = criteria.interval_s
        end = datetime.fromtimestamp(math.floor(end.timestamp() / step) * step, UTC)
    return end - timedelta(seconds=criteria.window_s), end


def targets(engine: Engine) -> list[tuple[str, int]]:
    """Every live version whose model's policy watches its stage."""
    with transaction(engine, read_only=True) as session:
        live = versions.in_stages(session, sorted(LIVE))
        watched = []
        for model, version in sorted(live):
            row = versions.get_version(session, model, version)
            if row.stage in get_policy(session, model).drift.stages:
                watched.append((model, version))
    return watched


def read_logged(
    log_url: str, model: str, version: int, start: datetime, end: datetime, c: DriftCriteria
) -> pa.Table:
    """The version's logged rows in the window, typed, with the latest label of each request
    when the policy names a label column."""
    current = read_features(log_url, model=model, version=version, since=start, until=end)
    if c.label_column is None or current.num_rows == 0:
        return current
    latest: dict[str, Any] = {}
    for row in read_labels(log_url, model=model).to_pylist():  # ordered by `at`
        latest[row["request_id"]] = row["label"]
    labels = [loads(latest.get(rid)) for rid in current.column("request_id").to_pylist()]
    try:
        column = pa.array(labels)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # labels of mixed kinds: compare as text
        column = pa.array([None if v is None else str(v) for v in labels], pa.string())
    if c.label_column in current.column_names:
        current = current.drop_columns([c.label_column])
    return current.append_column(c.label_column, column)


def _reason(report: DriftReport) -> str:
    d = report.dataset
    if d.verdict == INSUFFICIENT:
        why = sorted({c.reason for c in report.columns if c.reason}) or ["no column to test"]
        return f"insufficient data ({report.current_rows} rows in the window): {why[0]}"
    share = f"{d.drifted_columns} of {d.tested_columns} columns"
    if d.verdict == DRIFT:
        return f"drift in {share} ({', '.join(report.drifted_columns)})"
    return f"no drift: {share} drifted, below the share {d.drift_share:g}"


def _key_name(model: str, version: int, start: datetime, digest: str | None) -> str:
    key = evaluations.evidence_key(model, version, KIND, start, digest, None)
    return f"v{version}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"


def _report_url(monitor: Monitor, evaluation_id: int | None) -> str | None:
    if monitor.api_url is None or evaluation_id is None:
        return None
    return f"{monitor.api_url.rstrip('/')}/api/v1/reports/{evaluation_id}"


def _html(
    monitor: Monitor,
    name: str,
    model: str,
    reference: pa.Table,
    current: pa.Table,
    report: DriftReport,
    c: DriftCriteria,
) -> dict[str, str] | None:
    """Render and store Evidently's report; a failure costs the report, never the verdict."""
    try:
        from stagegate.monitoring.evidently import render_html

        html = render_html(reference, current, report, c.report_sample_rows)
        path, sha256 = reports.save(monitor.log_url, model, name, html)
    except Exception as exc:  # Evidently raises many kinds; the check's result stands
        log.warning("drift report for %s not rendered: %s", name, exc)
        return None
    return {"path": path, "sha256": sha256}


def _measure(
    monitor: Monitor,
    model: str,
    version: int,
    digest: str | None,
    c: DriftCriteria,
    start: datetime,
    end: datetime,
) -> tuple[str, str, int, dict[str, Any]]:
    """(verdict, reason, rows, summary) of one window."""
    try:
        reference = monitor.load_reference(model, version)
    except NoReference as exc:
        return NO_REFERENCE, f"no reference: {exc.detail}", 0, {"verdict": NO_REFERENCE}
    reader = monitor.read_current or (
        lambda m, v, s, e, crit: read_logged(monitor.log_url, m, v, s, e, crit)
    )
    current = reader(model, version, start, end, c)
    found = check(reference, current, c)
    verdict = found.dataset.verdict
    summary: dict[str, Any] = {
        "verdict": verdict,
        "drifted_features": found.drifted_columns,
        **found.to_dict(),
    }
    if c.html_report and verdict in (OK, DRIFT):
        summary["report"] = _html(
            monitor, _key_name(model, version, start, digest), model, reference, current, found, c
        )
    return verdict, _reason(found), current.num_rows, summary


def check_version(
    monitor: Monitor, model: str, version: int, *, until: datetime | None = None
) -> DriftOutcome:
    """Check one version's latest window (aligned to the policy's interval unless `until` is
    given), record it once, and act on drift as the policy says."""
    with transaction(monitor.engine, read_only=True) as session:
        row = versions.get_version(session, model, version)
        c = get_policy(session, model).drift
        digest, stage = row.digest, row.stage
        start, end = window(c, until or utcnow(), aligned=until is None)
        existing = evaluations.find(
            session, evaluations.evidence_key(model, version, KIND, start, digest, None)
        )
    recorded = existing is None
    if existing is None:
        verdict, reason, rows, summary = _measure(monitor, model, version, digest, c, start, end)
        with transaction(monitor.engine) as session:
            existing = evaluations.record(
                session,
                model=model,
                version=version,
                kind=KIND,
                passed=verdict == OK,
                reason=reason,
                sample_size=rows,
                summary=summary,
                window_start=start,
                window_end=end,
                actor=SERVICE.name,
            )
    evaluation = existing
    summary = evaluation.summary
    outcome = DriftOutcome(
        model,
        version,
        str(summary.get("verdict", NO_REFERENCE)),
        evaluation.reason,
        start,
        end,
        evaluation.id,
        list(summary.get("drifted_features", [])),
        _report_url(monitor, evaluation.id) if summary.get("report") else None,
        recorded,
    )
    if outcome.verdict == DRIFT and stage in LIVE:
        act(monitor, evaluation, outcome, c)
    return outcome


def act(monitor: Monitor, evaluation: Evaluation, outcome: DriftOutcome, c: DriftCriteria) -> None:
    """Open or join the alarm; run each of the policy's actions that has not run for it."""
    with transaction(monitor.engine) as session:
        alarm, _ = alarms.raise_alarm(
            session, evaluation, outcome.drifted_features, actor=SERVICE.name
        )
    outcome.alarm_id = alarm.id
    if alarm.status is not AlarmStatus.open:
        return  # someone acknowledged this window's alarm: nothing more to set off
    if c.actions.rollback:
        outcome.actions["rollback"] = _rollback(monitor, alarm, outcome)
    if c.actions.alert_url:
        outcome.actions["alert"] = _alert(monitor, alarm, outcome, c.actions.alert_url)
    if c.actions.emit_event:
        outcome.actions["event"] = _event(monitor, alarm, outcome)


def _payload(alarm: DriftAlarm, outcome: DriftOutcome) -> dict[str, Any]:
    return {
        "model": outcome.model,
        "version": outcome.version,
        "alarm_id": alarm.id,
        "evaluation_id": outcome.evaluation_id,
        "drifted_features": outcome.drifted_features,
        "reason": outcome.reason,
        "window_start": outcome.window_start.isoformat(),
        "window_end": outcome.window_end.isoformat(),
        "report_url": outcome.report_url,
        "rollback_transition_id": alarm.rollback_transition_id,
    }


def _rollback(monitor: Monitor, alarm: DriftAlarm, outcome: DriftOutcome) -> str:
    if alarm.rollback_transition_id is not None:
        return f"opened before: {alarm.rollback_transition_id}"
    reason = f"drift alarm {alarm.id}: {outcome.reason}"
    with transaction(monitor.engine) as session:
        row = alarms.get_alarm(session, alarm.id, lock=True)
        if row.rollback_transition_id is not None:  # another check got here first
            return f"opened before: {row.rollback_transition_id}"
        try:
            t, _ = transitions.request(
                session,
                principal=SERVICE,
                model=outcome.model,
                version=outcome.version,
                to_stage=Stage.rolled_back,
                reason=reason[:2000],
                now=utcnow(),
                idempotency_key=f"drift-rollback:{alarm.id}",
            )
        except (ConflictError, TransitionRejected) as exc:
            alarms.record_action(
                session, row, "rollback_not_opened", actor=SERVICE.name, reason=exc.detail
            )
            return f"not opened: {exc.detail}"
        row.rollback_transition_id = t.id
        alarms.record_action(session, row, "rollback_opened", actor=SERVICE.name, transition=t.id)
    alarm.rollback_transition_id = t.id
    announce_if_approved(monitor.sink, t)  # lost: reconcile applies stale approvals
    return f"{t.status}: {t.id}"


def _alert(monitor: Monitor, alarm: DriftAlarm, outcome: DriftOutcome, url: str) -> str:
    if alarm.alert_status is not None:
        return f"{alarm.alert_status} before"
    attempts: list[Attempt] = []
    result = send_alert(
        url,
        {"event": DRIFT_EVENT, **_payload(alarm, outcome)},
        delivery_id=alarm.id,
        settings=monitor.alerts,
        on_attempt=attempts.append,
    )
    with transaction(monitor.engine) as session:
        row = alarms.get_alarm(session, alarm.id, lock=True)
        for a in attempts:
            alarms.record_action(
                session,
                row,
                "alert_attempt",
                actor=SERVICE.name,
                url=url,
                attempt=a.number,
                status_code=a.status_code,
                error=a.error,
            )
        row.alert_status = result.status
        row.alert_attempts += len(attempts)
        alarms.record_action(
            session, row, f"alert_{result.status}", actor=SERVICE.name, reason=result.reason
        )
    alarm.alert_status = result.status
    return f"{result.status}: {result.reason}"


def _event(monitor: Monitor, alarm: DriftAlarm, outcome: DriftOutcome) -> str:
    if alarm.event_emitted_at is not None:
        return "emitted before"
    event = OutEvent(
        id=str(uuid5(NAMESPACE_URL, f"stagegate:{DRIFT_EVENT}:{alarm.id}")),
        event=DRIFT_EVENT,
        resource=model_resource(
            outcome.model,
            outcome.version,
            **{"stagegate.drift.features": ",".join(outcome.drifted_features)[:500]},
        ),
        payload=_payload(alarm, outcome),
    )
    monitor.sink.emit(event)  # RetryableError: the flow retries, the alarm is not marked
    with transaction(monitor.engine) as session:
        row = alarms.get_alarm(session, alarm.id, lock=True)
        row.event_emitted_at = utcnow()
        alarms.record_action(session, row, "event_emitted", actor=SERVICE.name, event=event.id)
    return f"emitted {event.id}"
