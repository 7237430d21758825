"""The canary as an A/B experiment: one look at the logged answers and their labels.

The flow calls `look` every few seconds. Each look runs the sequential test on the business
metric and on the guardrails, stores its figures for the chart, and, once the test decides,
records an `experiment` evaluation bound to the digest and the champion. The evaluation is
keyed like every report, so a re-run look returns the recorded decision. The decision's
actions follow the policy: a win requests canary->production (approvers still decide), a
guardrail breach requests canary->rolled_back, which may apply alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from stagegate.db import Engine, transaction, utcnow
from stagegate.errors import ConflictError, TransitionRejected
from stagegate.events.announce import announce_if_approved
from stagegate.events.sink import EventSink
from stagegate.experiments.decision import Decision, GuardrailCheck, decide
from stagegate.experiments.sequential import SequentialResult, sequential_test
from stagegate.experiments.variance import cuped, winsorize
from stagegate.governance import evaluations, experiments, transitions
from stagegate.governance.models import ExperimentLook
from stagegate.lifecycle.policy import ExperimentCriteria
from stagegate.lifecycle.stages import Stage
from stagegate.serving.inference_log.labels import read_outcomes
from stagegate.steps.common import SERVICE, evidence_context, regate
from stagegate.steps.experiment_data import Samples, samples

KIND = "experiment"


@dataclass
class ExperimentOutcome:
    model: str
    version: int
    action: str  # continue | promote | rollback
    reason: str
    decided: bool = False
    passed: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
    evaluation_id: int | None = None
    transition_id: str | None = None
    approved: list[str] = field(default_factory=list)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _test_metric(s: Samples, c: ExperimentCriteria) -> tuple[SequentialResult, dict[str, Any]]:
    """The primary test, after the policy's winsorising and CUPED."""
    t, k = s.treatment.units, s.control.units
    info: dict[str, Any] = {}
    if c.winsorize_quantile is not None and len(t) + len(k):
        cap = float(np.quantile(np.concatenate([t, k]), c.winsorize_quantile))
        t, k = winsorize(t, cap=cap), winsorize(k, cap=cap)
        info["winsorize_cap"] = cap
    if s.treatment.pre is not None and s.control.pre is not None and len(t) > 1 and len(k) > 1:
        adjusted = cuped(t, s.treatment.pre, k, s.control.pre)
        t, k = adjusted.treatment, adjusted.control
        info["cuped"] = {
            "theta": adjusted.theta,
            "variance_reduction": adjusted.variance_reduction,
        }
    result = sequential_test(t, k, alpha=c.alpha, metric=c.kind, max_samples=c.max_samples)
    return result, info


def _guardrails(s: Samples, c: ExperimentCriteria) -> list[GuardrailCheck]:
    """Untruncated always-valid tests, their mixture tuned to the allowance: the effect size
    whose crossing matters."""
    return [
        GuardrailCheck(
            "error_rate",
            sequential_test(
                s.treatment.errors,
                s.control.errors,
                alpha=c.alpha,
                metric="bernoulli",
                mde=c.max_error_rate_increase or None,
            ),
            c.max_error_rate_increase,
        ),
        GuardrailCheck(
            "latency_ms",
            sequential_test(
                s.treatment.latency_ms,
                s.control.latency_ms,
                alpha=c.alpha,
                metric="continuous",
                mde=c.max_latency_increase_ms or None,
            ),
            c.max_latency_increase_ms,
        ),
    ]


def _relative(estimate: float, base: float) -> float | None:
    return _finite(estimate / base) if base else None


def _offline_gain(metrics: dict[str, float], champion: dict[str, float], name: str | None) -> Any:
    if name is None or name not in metrics or name not in champion:
        return None
    mine, theirs = metrics[name], champion[name]
    return {
        "metric": name,
        "version": mine,
        "champion": theirs,
        "relative": _relative(mine - theirs, theirs),
    }


def _summary(
    s: Samples,
    primary: SequentialResult,
    info: dict[str, Any],
    guardrails: list[GuardrailCheck],
    decision: Decision,
    offline: Any,
    c: ExperimentCriteria,
    elapsed_s: float,
) -> dict[str, Any]:
    return {
        "metric": c.metric,
        "kind": c.kind,
        "action": decision.action,
        "breached": list(decision.breached),
        "elapsed_s": round(elapsed_s, 3),
        "primary": _clean(primary.to_dict()),
        "adjustments": info,
        "guardrails": {
            g.name: {**_clean(g.result.to_dict()), "max_increase": g.max_increase}
            for g in guardrails
        },
        "treatment": s.treatment.counts(),
        "control": s.control.counts(),
        "notes": s.notes,
        # The gap people want to see: what the offline metric promised, what the A/B found.
        "offline_gain": offline,
        "online_gain": {
            "absolute": _finite(primary.estimate),
            "relative": _relative(primary.estimate, primary.mean_control),
        },
    }


def _clean(doc: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: an unbounded interval end is stored as null."""
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in doc.items()}


def look(
    engine: Engine,
    sink: EventSink,
    log_url: str,
    model: str,
    version: int,
    *,
    now: datetime | None = None,
) -> ExperimentOutcome:
    """One look. Returns the recorded decision if this experiment was decided before."""
    now = now or utcnow()
    ctx = evidence_context(engine, model, version, KIND)
    policy, recorded, champion_version = ctx.policy, ctx.recorded, ctx.champion_version
    digest, since, stage = ctx.digest, ctx.since, ctx.stage
    c = policy.experiment
    if stage is not Stage.canary or c is None:
        return ExperimentOutcome(model, version, "continue", f"v{version} runs no experiment")
    if recorded is not None:
        # Decided before; its action is keyed by the report, so repeating it is safe and
        # completes one a crash cut short.
        outcome = _from_record(model, version, recorded)
        outcome.transition_id = _act(engine, sink, outcome, c)
        return outcome
    if champion_version is None:
        # The first version of a model has no champion, so no control arm: nothing to test.
        primary = None
        decision = Decision("promote", "no champion yet: nothing to compare with", ())
        summary: dict[str, Any] = {"action": "promote", "breached": []}
    else:
        window = read_outcomes(log_url, model, since=since, until=now).to_pylist()
        pre_rows = None
        if c.cuped:
            pre_rows = [
                r
                for r in read_outcomes(
                    log_url, model, since=since - timedelta(seconds=c.pre_period_s), until=since
                ).to_pylist()
                if r["version"] == champion_version
            ]
        s = samples(
            window,
            pre_rows,
            c,
            now,
            treatment_version=version,
            control_version=champion_version,
        )
        primary, info = _test_metric(s, c)
        guardrails = _guardrails(s, c)
        elapsed = (now - since).total_seconds()
        decision = decide(
            primary,
            guardrails,
            min_samples=c.min_samples,
            max_samples=c.max_samples,
            elapsed_s=elapsed,
            max_duration_s=c.max_duration_s,
            min_effect=c.min_effect,
            higher_is_better=c.higher_is_better,
        )
        offline = _offline_gain(ctx.metrics, ctx.champion_metrics, policy.primary_metric)
        summary = _summary(s, primary, info, guardrails, decision, offline, c, elapsed)
    outcome = ExperimentOutcome(model, version, decision.action, decision.reason, summary=summary)
    with transaction(engine) as session:
        if primary is not None:
            experiments.record_look(
                session,
                ExperimentLook(
                    model_name=model,
                    version=version,
                    digest=digest,
                    champion_version=champion_version,
                    window_start=since,
                    at=now,
                    action=decision.action,
                    n_treatment=primary.n_treatment,
                    n_control=primary.n_control,
                    estimate=_finite(primary.estimate),
                    lower=_finite(primary.lower),
                    upper=_finite(primary.upper),
                    detail={k: v for k, v in summary.items() if k != "notes"},
                ),
            )
        if decision.action == "continue":
            return outcome
        report = evaluations.record(
            session,
            model=model,
            version=version,
            kind=KIND,
            passed=decision.action == "promote",
            reason=decision.reason[:2000],
            sample_size=0 if primary is None else primary.n_treatment + primary.n_control,
            summary=summary,
            window_start=since,
            window_end=now,
            champion_version=champion_version,
            actor=SERVICE.name,
        )
        # Keyed: a racing look that recorded first wins, and this one reports its decision.
        decided = _from_record(model, version, report)
    decided.transition_id = _act(engine, sink, decided, c)
    with transaction(engine, read_only=True) as session:
        waiting = transitions.pending_ids(session, model=model, version=version)
    decided.approved = regate(engine, sink, waiting)
    return decided


def _from_record(model: str, version: int, report: Any) -> ExperimentOutcome:
    summary = dict(report.summary)
    return ExperimentOutcome(
        model,
        version,
        str(summary.get("action", "promote" if report.passed else "rollback")),
        report.reason,
        decided=True,
        passed=report.passed,
        summary=summary,
        evaluation_id=report.id,
    )


def _act(
    engine: Engine, sink: EventSink, outcome: ExperimentOutcome, c: ExperimentCriteria
) -> str | None:
    """Open the transition the decision calls for, once: the idempotency key is the report."""
    if outcome.action == "promote" and c.actions.request_promotion:
        to_stage = Stage.production
    elif outcome.action == "rollback" and outcome.summary.get("breached"):
        if not c.actions.rollback_on_breach:
            return None
        to_stage = Stage.rolled_back
    else:
        return None  # an inconclusive or losing test leaves the next move to people
    with transaction(engine) as session:
        try:
            t, _ = transitions.request(
                session,
                principal=SERVICE,
                model=outcome.model,
                version=outcome.version,
                to_stage=to_stage,
                reason=f"experiment: {outcome.reason}"[:2000],
                now=utcnow(),
                idempotency_key=f"experiment:{outcome.evaluation_id}:{to_stage}",
            )
        except (ConflictError, TransitionRejected):
            return None  # someone already moved it, or a transition is open: theirs stands
    announce_if_approved(sink, t)  # lost: reconcile applies stale approvals
    return t.id
