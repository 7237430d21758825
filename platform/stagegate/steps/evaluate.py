"""Shadow and canary reports: compare the version's live answers with the champion's, decide
by the model's policy, record the report, and let waiting transitions re-run their gates."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from stagegate.db import Engine, transaction, utcnow
from stagegate.events.sink import EventSink
from stagegate.governance import evaluations, transitions, versions
from stagegate.governance.policies import get_policy
from stagegate.lifecycle.policy import CanaryCriteria, ShadowCriteria
from stagegate.lifecycle.stages import DEPLOYMENT_ROLE, Stage
from stagegate.serving.inference_log.comparison import Comparison, compare
from stagegate.steps import experiment
from stagegate.steps.common import SERVICE, regate

KIND = {Stage.shadow: "shadow", Stage.canary: "canary"}


@dataclass
class EvaluateResult:
    model: str
    version: int
    kind: str | None  # None: the version is not in shadow or canary (nothing to evaluate)
    decided: bool = False
    passed: bool = False
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    approved: list[str] = field(default_factory=list)


def _shadow_verdict(
    c: Comparison, rule: ShadowCriteria, out_of_time: bool
) -> tuple[bool, bool, str]:
    """(decided, passed, reason)."""
    # Wait for enough comparisons, unless the shadow has already failed so often that no
    # number of comparisons could save it: a shadow that always fails fails its report now.
    doomed = c.arm.requests >= rule.min_comparisons and c.arm.error_rate > rule.max_error_rate
    if c.compared < rule.min_comparisons and not out_of_time and not doomed:
        return False, False, f"{c.compared} of {rule.min_comparisons} comparisons so far"
    problems = []
    if c.compared < rule.min_comparisons:
        problems.append(f"only {c.compared} of {rule.min_comparisons} comparisons in time")
    if c.agreement is not None and c.agreement < rule.min_agreement:
        problems.append(f"agreement {c.agreement:.1%} < {rule.min_agreement:.0%}")
    if c.arm.error_rate > rule.max_error_rate:
        problems.append(f"error rate {c.arm.error_rate:.2%} > {rule.max_error_rate:.2%}")
    agreement = "n/a" if c.agreement is None else f"{c.agreement:.1%}"
    facts = (
        f"{c.compared} comparisons, agreement {agreement}, errors {c.arm.error_rate:.2%}, "
        f"p99 {c.arm.p99_ms} ms vs champion {c.champion.p99_ms} ms"
    )
    return True, not problems, facts + ("; " + "; ".join(problems) if problems else "")


def _canary_verdict(
    c: Comparison, rule: CanaryCriteria, out_of_time: bool
) -> tuple[bool, bool, str]:
    if c.arm.requests < rule.min_requests and not out_of_time:
        return False, False, f"{c.arm.requests} of {rule.min_requests} canary requests so far"
    problems = []
    if c.arm.requests < rule.min_requests:
        problems.append(f"only {c.arm.requests} of {rule.min_requests} requests in time")
    delta = c.arm.error_rate - c.champion.error_rate
    if delta > rule.max_error_rate_delta:
        problems.append(f"error rate +{delta:.2%} over the champion")
    if c.arm.p50_ms is not None and c.champion.p50_ms:
        ratio, gap = c.arm.p50_ms / c.champion.p50_ms, c.arm.p50_ms - c.champion.p50_ms
        if ratio > rule.max_latency_ratio and gap > rule.min_latency_delta_ms:
            problems.append(f"median latency {ratio:.2f}x the champion's (+{gap:.1f} ms)")
    facts = (
        f"{c.arm.requests} requests, errors {c.arm.error_rate:.2%} vs "
        f"{c.champion.error_rate:.2%}, median {c.arm.p50_ms} ms vs {c.champion.p50_ms} ms, "
        f"p99 {c.arm.p99_ms} ms vs {c.champion.p99_ms} ms"
    )
    return True, not problems, facts + ("; " + "; ".join(problems) if problems else "")


def _experiment(
    engine: Engine, sink: EventSink, log_url: str, model: str, version: int, now: datetime
) -> EvaluateResult:
    """The policy runs this canary as an A/B experiment: one look of the sequential test."""
    outcome = experiment.look(engine, sink, log_url, model, version, now=now)
    return EvaluateResult(
        model,
        version,
        experiment.KIND,
        decided=outcome.decided,
        passed=outcome.passed,
        reason=outcome.reason,
        summary=outcome.summary,
        approved=outcome.approved,
    )


def evaluate(
    engine: Engine,
    sink: EventSink,
    log_url: str,
    model: str,
    version: int,
    *,
    now: datetime | None = None,
) -> EvaluateResult:
    """Decide the report once there is enough traffic (or time is up). Keyed by the window,
    artifact and champion: once decided, a call returns the recorded report without reading
    the log; an undecided call records nothing."""
    now = now or utcnow()
    with transaction(engine, read_only=True) as session:
        row = versions.get_version(session, model, version)
        stage, since = row.stage, row.stage_changed_at
        policy = get_policy(session, model)
        champion = versions.holder(session, model, Stage.production)
        champion_version = champion.version if champion else None
        kind = KIND.get(stage)
        recorded = (
            None
            if kind is None
            else evaluations.find(
                session,
                evaluations.evidence_key(model, version, kind, since, row.digest, champion_version),
            )
        )
    if kind == "canary" and policy.experiment is not None:
        return _experiment(engine, sink, log_url, model, version, now)
    result = EvaluateResult(model, version, kind)
    if kind is None:
        result.reason = f"v{version} is {stage}: nothing to evaluate"
        return result
    if recorded is not None:
        result.decided, result.passed, result.reason = True, recorded.passed, recorded.reason
        result.summary = recorded.summary
        return result
    out_of_time = (now - since).total_seconds() > (
        policy.shadow.max_wait_s if kind == "shadow" else policy.canary.max_wait_s
    )
    if champion_version is None:
        # The first version of a model has no champion: no traffic to mirror or split.
        decided, passed, reason = True, True, "no champion yet: nothing to compare with"
    else:
        comparison = compare(
            log_url,
            model,
            arm_version=version,
            role=DEPLOYMENT_ROLE[stage],
            champion_version=champion_version,
            since=since,
        )
        result.summary = comparison.summary()
        decided, passed, reason = (
            _shadow_verdict(comparison, policy.shadow, out_of_time)
            if kind == "shadow"
            else _canary_verdict(comparison, policy.canary, out_of_time)
        )
    result.decided, result.passed, result.reason = decided, passed, reason
    if not decided:
        return result
    with transaction(engine) as session:
        report = evaluations.record(
            session,
            model=model,
            version=version,
            kind=kind,
            passed=passed,
            reason=reason,
            sample_size=int(result.summary.get("compared", 0)),
            summary=result.summary,
            window_start=since,
            window_end=now,
            champion_version=champion_version,
            actor=SERVICE.name,
        )
        # Keyed: a re-run (or a racing flow) gets the report already recorded, unchanged.
        result.passed, result.reason = report.passed, report.reason
    # Transitions waiting on this report re-run their gates now, not at the next reconcile.
    with transaction(engine, read_only=True) as session:
        waiting = transitions.pending_ids(session, model=model, version=version)
    result.approved = regate(engine, sink, waiting)
    return result
