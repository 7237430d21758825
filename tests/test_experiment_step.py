"""The canary as an A/B experiment, on a real inference log, real labels and a real database:
looks over time, the decision, its evidence binding, and what it may do by itself."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from stagegate.db import transaction
from stagegate.events.sink import MemorySink
from stagegate.governance import evaluations, experiments, policies, transitions, versions
from stagegate.governance.models import TransitionStatus
from stagegate.lifecycle.gates import (
    CanaryReportGate,
    ExperimentGate,
    GateContext,
    ReportFacts,
    TaskMetricsGate,
    VersionFacts,
)
from stagegate.lifecycle.policy import (
    ExperimentActions,
    ExperimentCriteria,
    Policy,
    TaskCriteria,
    default_policy,
)
from stagegate.lifecycle.stages import Stage
from stagegate.serving.inference_log.labels import LabelRecord, attach_labels
from stagegate.serving.inference_log.records import InferenceRecord
from stagegate.serving.inference_log.writer import LocalInferenceLog
from stagegate.steps import experiment
from stagegate.steps.evaluate import evaluate
from stagegate.steps.experiment_data import build_arm, metric_value
from tests.factories import Factory

MODEL = "shop"


def _criteria(**kw: object) -> ExperimentCriteria:
    base: dict[str, object] = {
        "metric": "converted",
        "attribution_window_s": 60,
        "min_samples": 200,
        "max_samples": 20_000,
    }
    base.update(kw)
    return ExperimentCriteria.model_validate(base)


def _policy(criteria: ExperimentCriteria) -> Policy:
    return default_policy().model_copy(update={"experiment": criteria, "primary_metric": "auc"})


def _canary(engine: Engine, factory: Factory, criteria: ExperimentCriteria) -> datetime:
    factory.version(MODEL, 1, metrics={"auc": 0.80})
    factory.version(MODEL, 2, metrics={"auc": 0.84})
    factory.place(MODEL, 1, Stage.production)
    factory.place(MODEL, 2, Stage.canary)
    with transaction(engine) as s:
        policies.set_policy(s, MODEL, _policy(criteria), actor="test")
        return versions.get_version(s, MODEL, 2).stage_changed_at


def _traffic(
    root: Path,
    start: datetime,
    *,
    n: int,
    p_champion: float,
    p_canary: float,
    canary_errors: float = 0.0,
    seed: int = 0,
) -> None:
    """`n` requests per arm, one per second from `start`, each labelled a second later."""
    rng = np.random.default_rng(seed)
    log = LocalInferenceLog(str(root), flush_interval_s=0.05)
    labels = []
    for i in range(n):
        at = start + timedelta(seconds=i)
        for version, role, p in ((1, "champion", p_champion), (2, "challenger", p_canary)):
            rid = f"{role}-{i}"
            failed = version == 2 and rng.random() < canary_errors
            log.append(
                InferenceRecord(
                    rid,
                    MODEL,
                    version,
                    role,
                    f"user{version}-{i}",
                    {},
                    [0],
                    500 if failed else 200,
                    float(rng.normal(10, 1)),
                    at,
                )
            )
            converted = int(rng.random() < p)
            labels.append(
                LabelRecord(rid, MODEL, {"converted": converted}, at + timedelta(seconds=1))
            )
    log.close()
    attach_labels(str(root), labels)


def test_a_better_canary_wins_the_experiment_and_requests_its_promotion(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    start = _canary(engine, factory, _criteria())
    _traffic(tmp_path, start, n=4000, p_champion=0.10, p_canary=0.16)
    outcomes = []
    # Look every 300 s of traffic, as the flow would; labels mature 60 s after each request.
    for t in range(100, 4400, 300):
        out = experiment.look(
            engine, sink, str(tmp_path), MODEL, 2, now=start + timedelta(seconds=t)
        )
        outcomes.append(out)
        if out.decided:
            break
    decided = outcomes[-1]
    assert decided.action == "promote", decided.reason
    assert decided.passed
    assert outcomes[0].action == "continue", "the first look has too few matured units"
    primary = decided.summary["primary"]
    assert primary["lower"] > 0
    assert 0.02 < primary["estimate"] < 0.10
    assert decided.summary["offline_gain"]["relative"] == pytest.approx(0.05)
    assert decided.summary["online_gain"]["relative"] == pytest.approx(
        primary["estimate"] / primary["mean_control"]
    )
    with transaction(engine) as s:
        looks = experiments.looks_for(s, MODEL, 2)
        assert [lk.action for lk in looks][-1] == "promote"
        widths = [
            lk.upper - lk.lower for lk in looks if lk.upper is not None and lk.lower is not None
        ]
        assert widths == sorted(widths, reverse=True), "the interval narrows as samples grow"
        assert [lk.n_treatment for lk in looks] == sorted(lk.n_treatment for lk in looks)
        report = evaluations.facts(s, MODEL, 2)["experiment"]
        assert report.passed
        assert report.digest == versions.get_version(s, MODEL, 2).digest
        assert report.champion_version == 1
        # The win opened canary->production; it waits for its two approvers.
        t = transitions.get_transition(s, decided.transition_id or "")
        assert (t.to_stage, t.requested_by, t.status) == (
            Stage.production,
            "stagegate",
            TransitionStatus.pending,
        )
        gates = {g["gate"]: g for g in t.gate_results}
        assert gates["experiment"]["passed"], gates
        assert not gates["approvals"]["passed"]
        assert "canary_report" not in gates  # the experiment takes the threshold report's place


def test_a_decided_experiment_is_recorded_once_and_acts_once(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    start = _canary(engine, factory, _criteria())
    _traffic(tmp_path, start, n=3000, p_champion=0.10, p_canary=0.25)
    now = start + timedelta(seconds=3100)
    first = experiment.look(engine, sink, str(tmp_path), MODEL, 2, now=now)
    again = evaluate(engine, sink, str(tmp_path), MODEL, 2, now=now + timedelta(seconds=5))
    assert first.decided
    assert again.decided
    assert again.kind == "experiment"
    assert again.reason == first.reason
    with transaction(engine) as s:
        assert [e.kind for e in evaluations.list_for(s, MODEL, 2)] == ["experiment"]
        assert transitions.pending_ids(s, model=MODEL, version=2) == [first.transition_id]


def test_a_guardrail_breach_rolls_the_canary_back_alone_as_the_service(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    criteria = _criteria(
        actions=ExperimentActions(rollback_applies_alone=True), max_error_rate_increase=0.01
    )
    start = _canary(engine, factory, criteria)
    _traffic(tmp_path, start, n=2000, p_champion=0.1, p_canary=0.1, canary_errors=0.2)
    out = experiment.look(
        engine, sink, str(tmp_path), MODEL, 2, now=start + timedelta(seconds=2100)
    )
    assert out.action == "rollback", out.reason
    assert out.summary["breached"] == ["error_rate"]
    with transaction(engine) as s:
        t = transitions.get_transition(s, out.transition_id or "")
        assert (t.to_stage, t.requested_by) == (Stage.rolled_back, "stagegate")
        assert t.status is TransitionStatus.approved, t.gate_results
        approvals = {g["gate"]: g for g in t.gate_results}["approvals"]
        assert "guardrail rollback applies alone" in approvals["reason"]
        assert not evaluations.facts(s, MODEL, 2)["experiment"].passed
    assert [e.event for e in sink.events][-1] == "stagegate.transition.approved"


def test_without_the_policy_a_breach_rollback_waits_for_an_approver(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    start = _canary(engine, factory, _criteria())
    _traffic(tmp_path, start, n=2000, p_champion=0.1, p_canary=0.1, canary_errors=0.2)
    out = experiment.look(
        engine, sink, str(tmp_path), MODEL, 2, now=start + timedelta(seconds=2100)
    )
    with transaction(engine) as s:
        t = transitions.get_transition(s, out.transition_id or "")
        assert t.to_stage is Stage.rolled_back
        assert t.status is TransitionStatus.pending


def test_too_few_units_continue_and_store_their_look(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    start = _canary(engine, factory, _criteria(min_samples=500))
    _traffic(tmp_path, start, n=100, p_champion=0.1, p_canary=0.9)
    out = experiment.look(engine, sink, str(tmp_path), MODEL, 2, now=start + timedelta(seconds=200))
    assert out.action == "continue"
    assert not out.decided
    # The same look again adds no point to the chart: nothing new was seen.
    experiment.look(engine, sink, str(tmp_path), MODEL, 2, now=start + timedelta(seconds=210))
    with transaction(engine) as s:
        assert len(experiments.looks_for(s, MODEL, 2)) == 1
        assert evaluations.list_for(s, MODEL, 2) == []


def test_the_experiment_endpoint_serves_the_looks_and_the_decision(
    engine: Engine,
    factory: Factory,
    sink: MemorySink,
    tmp_path: Path,
    client: TestClient,
) -> None:
    start = _canary(engine, factory, _criteria())
    _traffic(tmp_path, start, n=3000, p_champion=0.10, p_canary=0.25)
    for t in (100, 3100):
        experiment.look(engine, sink, str(tmp_path), MODEL, 2, now=start + timedelta(seconds=t))
    url = f"/api/v1/models/{MODEL}/versions/2/experiment"
    assert client.get(url).status_code == 401
    viewer = factory.token("vic", "viewer")
    doc = client.get(url, headers=viewer).json()
    assert [lk["n_treatment"] for lk in doc["looks"]] == sorted(
        lk["n_treatment"] for lk in doc["looks"]
    )
    assert len(doc["looks"]) == 2
    assert doc["decision"]["action"] == "promote"
    assert doc["decision"]["champion_version"] == 1
    assert doc["online_gain"]["absolute"] == pytest.approx(doc["looks"][-1]["estimate"])
    assert (
        client.get(f"/api/v1/models/{MODEL}/versions/9/experiment", headers=viewer).status_code
        == 404
    )


# --- attribution: labels arrive late ----------------------------------------------------


def _row(i: int, at: datetime, label: str | None, labeled_at: datetime | None) -> dict[str, object]:
    return {
        "request_id": f"r{i}",
        "key_hash": None,
        "status": 200,
        "latency_ms": 1.0,
        "at": at,
        "label": label,
        "labeled_at": labeled_at,
    }


def test_labels_count_only_within_their_attribution_window() -> None:
    c = _criteria(attribution_window_s=60, unit="request")
    t0 = datetime(2026, 12, 1, 12, 0)
    now = t0 + timedelta(seconds=100)
    rows = [
        _row(0, t0, '{"converted": 1}', t0 + timedelta(seconds=30)),  # in time: counts 1
        _row(1, t0, '{"converted": 1}', t0 + timedelta(seconds=90)),  # late: missing
        _row(2, t0, None, None),  # window over, no label: missing
        _row(3, now - timedelta(seconds=10), None, None),  # still waiting: not counted yet
        _row(4, t0, '{"other": 3}', t0),  # carries no value of the metric
    ]
    zero = build_arm(rows, c, now)
    assert (zero.labelled, zero.late, zero.missing, zero.pending, zero.unusable) == (1, 1, 3, 1, 1)
    assert sorted(zero.units.tolist()) == [0.0, 0.0, 0.0, 1.0]
    excluded = build_arm(rows, c.model_copy(update={"missing_label": "exclude"}), now)
    assert excluded.units.tolist() == [1.0]


def test_units_are_assignment_keys_averaged_over_their_requests() -> None:
    c = _criteria(kind="continuous", metric="revenue", attribution_window_s=60)
    t0 = datetime(2026, 12, 1, 12, 0)
    rows = [_row(i, t0, f'{{"revenue": {v}}}', t0) for i, v in enumerate((10, 20, 5))]
    rows[0]["key_hash"] = rows[1]["key_hash"] = "alice"
    arm = build_arm(rows, c, t0 + timedelta(seconds=120))
    assert sorted(arm.units.tolist()) == [5.0, 15.0]


@pytest.mark.parametrize(
    ("label", "kind", "value"),
    [
        ('{"converted": true}', "bernoulli", 1.0),
        ("1", "bernoulli", 1.0),
        ('{"converted": 0.5}', "bernoulli", None),
        ('{"converted": "yes"}', "bernoulli", None),
        ('{"converted": 12.5}', "continuous", 12.5),
        ("NaN", "continuous", None),
        ("not json", "continuous", None),
        ("[1, 2]", "continuous", None),
    ],
)
def test_metric_values_from_labels(label: str, kind: str, value: float | None) -> None:
    assert metric_value(label, "converted", kind) == value


# --- the gate --------------------------------------------------------------------------


def _ctx(policy: Policy, report: ReportFacts | None) -> GateContext:
    v = VersionFacts("m", 2, Stage.canary, "d2", "dana")
    champion = VersionFacts("m", 1, Stage.production, "d1", "dana")
    return GateContext(
        Stage.canary,
        Stage.production,
        "ann",
        v,
        champion,
        [],
        policy,
        datetime(2026, 12, 1),
        reports={} if report is None else {"experiment": report},
    )


def test_the_experiment_gate_counts_only_a_win_for_this_artifact_and_champion() -> None:
    policy = _policy(_criteria())
    gate = ExperimentGate()
    assert not CanaryReportGate().applies(_ctx(policy, None))
    assert not ExperimentGate().applies(_ctx(default_policy(), None))
    assert not gate.check(_ctx(policy, None)).passed
    win = ReportFacts("experiment", True, "won", "d2", 1)
    assert gate.check(_ctx(policy, win)).passed
    assert not gate.check(_ctx(policy, ReportFacts("experiment", True, "won", "old", 1))).passed
    assert not gate.check(_ctx(policy, ReportFacts("experiment", True, "won", "d2", 7))).passed
    assert not gate.check(_ctx(policy, ReportFacts("experiment", False, "lost", "d2", 1))).passed


# --- one version, many tasks --------------------------------------------------------------


def _task_ctx(policy: Policy, mine: dict[str, float], theirs: dict[str, float]) -> GateContext:
    return GateContext(
        Stage.candidate,
        Stage.shadow,
        "stagegate",
        VersionFacts("m", 2, Stage.candidate, "d2", "dana", metrics=mine),
        VersionFacts("m", 1, Stage.production, "d1", "dana", metrics=theirs),
        [],
        policy,
        datetime(2026, 12, 1),
    )


def test_a_multi_task_model_is_judged_task_by_task_and_names_the_regressing_task() -> None:
    champion = {f"task/t{i:02d}/auc": 0.80 for i in range(32)} | {"task/t00/logloss": 0.40}
    policy = default_policy().model_copy(
        update={
            "tasks": TaskCriteria(
                default_tolerance=0.005,
                tolerances={"t07": 0.05},
                lower_is_better=frozenset({"logloss"}),
            )
        }
    )
    gate = TaskMetricsGate()
    better = {k: v + 0.01 for k, v in champion.items() if k.endswith("auc")}
    better["task/t00/logloss"] = 0.39
    assert gate.check(_task_ctx(policy, better, champion)).passed
    # t07 may lose up to 0.05 by its own tolerance; t13 may lose only 0.005.
    mixed = better | {"task/t07/auc": 0.76, "task/t13/auc": 0.79}
    result = gate.check(_task_ctx(policy, mixed, champion))
    assert not result.passed
    assert result.reason.startswith("t13 regressed against champion v1")
    assert "t07" not in result.reason.split(":")[0]
    # Lower is better for logloss: a rise is a regression, and a missing task fails too.
    worse_loss = better | {"task/t00/logloss": 0.45}
    assert "t00 regressed" in gate.check(_task_ctx(policy, worse_loss, champion)).reason
    dropped = {k: v for k, v in better.items() if "t31" not in k}
    assert "t31 regressed" in gate.check(_task_ctx(policy, dropped, champion)).reason
    assert not gate.applies(_task_ctx(default_policy(), better, champion))
