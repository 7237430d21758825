"""Shadow and canary reports from a real inference log, and the gates that wait on them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import select

from stagegate.db import transaction, utcnow
from stagegate.events.sink import MemorySink
from stagegate.governance import evaluations, transitions, versions
from stagegate.governance.models import Transition, TransitionStatus
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.gates import GateContext, ShadowReportGate, VersionFacts
from stagegate.lifecycle.policy import default_policy
from stagegate.lifecycle.stages import DeploymentRole, Role, Stage
from stagegate.serving.inference_log.comparison import compare
from stagegate.serving.inference_log.records import InferenceRecord
from stagegate.serving.inference_log.writer import LocalInferenceLog
from stagegate.steps.converge import DataPlane
from stagegate.steps.evaluate import evaluate
from stagegate.steps.reconcile import reconcile
from tests.factories import Factory
from tests.fakes import FakeBackend, FakeRegistry


def _stage(engine: Engine, version: int, stage: Stage, *, ago_s: float = 0) -> None:
    with transaction(engine) as s:
        v = versions.get_version(s, "fraud", version)
        v.stage, v.stage_changed_at = stage, utcnow() - timedelta(seconds=ago_s)
        s.add(v)


def _log(
    root: Path,
    *,
    n: int,
    disagree_every: int = 0,
    shadow_status: int = 200,
    role: str = "shadow",
    arm_latency: float = 1.0,
) -> None:
    log = LocalInferenceLog(str(root), flush_interval_s=0.05)
    at = utcnow()
    for i in range(n):
        rid = f"r{i}"
        log.append(InferenceRecord(rid, "fraud", 1, "champion", None, {}, [i % 2], 200, 1.0, at))
        answer = [1 - i % 2] if disagree_every and i % disagree_every == 0 else [i % 2]
        arm_id = rid if role == "shadow" else f"c{i}"
        log.append(
            InferenceRecord(
                arm_id,
                "fraud",
                2,
                role,
                None,
                {},  # type: ignore[arg-type]
                answer if shadow_status == 200 else None,
                shadow_status,
                arm_latency,
                at,
            )
        )
    log.close()


def _setup(factory: Factory, engine: Engine, stage: Stage) -> None:
    factory.version("fraud", 1)
    factory.version("fraud", 2)
    _stage(engine, 1, Stage.production, ago_s=600)
    _stage(engine, 2, stage, ago_s=60)


def test_shadow_report_passes_when_answers_agree(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _setup(factory, engine, Stage.shadow)
    _log(tmp_path, n=300, disagree_every=50)  # 98% agreement
    result = evaluate(engine, sink, str(tmp_path), "fraud", 2)
    assert result.decided
    assert result.passed, result.reason
    assert result.summary["compared"] == 300
    assert result.summary["agreement"] == 0.98
    with transaction(engine) as s:
        assert evaluations.facts(s, "fraud", 2)["shadow"].passed


def test_shadow_report_fails_on_disagreement_and_on_errors(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _setup(factory, engine, Stage.shadow)
    _log(tmp_path / "a", n=300, disagree_every=2)  # 50% agreement
    bad = evaluate(engine, sink, str(tmp_path / "a"), "fraud", 2)
    assert bad.decided
    assert not bad.passed
    assert "agreement 50.0%" in bad.reason
    _log(tmp_path / "b", n=300, shadow_status=500)
    # The same window is the same evidence: a re-run returns the recorded report, adds none.
    again = evaluate(engine, sink, str(tmp_path / "b"), "fraud", 2)
    assert again.reason == bad.reason
    with transaction(engine) as s:
        assert len(evaluations.list_for(s, "fraud", 2)) == 1
    _stage(engine, 2, Stage.shadow, ago_s=30)  # back in shadow: a new window
    failing = evaluate(engine, sink, str(tmp_path / "b"), "fraud", 2)
    assert failing.decided
    assert not failing.passed
    assert "error rate" in failing.reason


def test_a_report_counts_only_for_its_artifact_and_champion(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _setup(factory, engine, Stage.shadow)
    _log(tmp_path, n=300)
    assert evaluate(engine, sink, str(tmp_path), "fraud", 2).passed
    with transaction(engine) as s:
        report = evaluations.facts(s, "fraud", 2)["shadow"]
        assert (report.digest, report.champion_version) == (f"{2:064x}", 1)
    gate = ShadowReportGate()

    def verdict(*, digest: str, champion: int) -> str:
        ctx = GateContext(
            from_stage=Stage.shadow,
            to_stage=Stage.canary,
            requested_by="erin",
            version=VersionFacts("fraud", 2, Stage.shadow, digest, "dana"),
            champion=VersionFacts("fraud", champion, Stage.production, "c", "dana"),
            approvals=[],
            policy=default_policy(),
            now=utcnow(),
            reports={"shadow": report},
        )
        result = gate.check(ctx)
        return "ok" if result.passed else result.reason

    assert verdict(digest=f"{2:064x}", champion=1) == "ok"
    assert "judged another artifact" in verdict(digest="f" * 64, champion=1)
    assert "the champion is v3" in verdict(digest=f"{2:064x}", champion=3)


def test_too_little_traffic_is_undecided_until_time_runs_out(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _setup(factory, engine, Stage.shadow)
    _log(tmp_path, n=50)
    early = evaluate(engine, sink, str(tmp_path), "fraud", 2)
    assert not early.decided
    assert "50 of 200" in early.reason
    with transaction(engine) as s:
        assert evaluations.latest(s, "fraud", 2) == {}  # nothing recorded while undecided
    late = evaluate(engine, sink, str(tmp_path), "fraud", 2, now=utcnow() + timedelta(hours=2))
    assert late.decided
    assert not late.passed
    assert "in time" in late.reason


def test_first_version_passes_with_nothing_to_compare(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    factory.version("fraud", 1)
    _stage(engine, 1, Stage.shadow)
    result = evaluate(engine, sink, str(tmp_path), "fraud", 1)
    assert result.decided
    assert result.passed
    assert "no champion" in result.reason


def test_canary_report_by_policy_threshold(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _setup(factory, engine, Stage.canary)
    _log(tmp_path / "ok", n=250, role="challenger")
    ok = evaluate(engine, sink, str(tmp_path / "ok"), "fraud", 2)
    assert ok.passed, ok.reason
    # Each scenario is a new canary window (the same window is one report, recorded once).
    _stage(engine, 2, Stage.canary, ago_s=50)
    _log(tmp_path / "noisy", n=250, role="challenger", arm_latency=3.0)
    noisy = evaluate(engine, sink, str(tmp_path / "noisy"), "fraud", 2)
    assert noisy.passed, "3x of 1 ms is only +2 ms: under the absolute floor"
    _stage(engine, 2, Stage.canary, ago_s=40)
    _log(tmp_path / "slow", n=250, role="challenger", arm_latency=20.0)
    slow = evaluate(engine, sink, str(tmp_path / "slow"), "fraud", 2)
    assert slow.decided
    assert not slow.passed
    assert "median latency 20.00x the champion's (+19.0 ms)" in slow.reason


def _request_canary_approved_by_a_person(engine: Engine) -> str:
    """shadow->canary requested and approved; it still waits for the shadow report."""
    with transaction(engine) as s:
        t, _ = transitions.request(
            s,
            principal=Principal("erin", Role.author),
            model="fraud",
            version=2,
            to_stage=Stage.canary,
            reason="x",
            now=utcnow(),
        )
        transitions.decide(
            s,
            principal=Principal("alice", Role.approver),
            transition_id=t.id,
            decision="approve",
            comment=None,
            now=utcnow(),
        )
        return t.id


def test_a_waiting_transition_is_approved_by_the_report(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _setup(factory, engine, Stage.shadow)
    tid = _request_canary_approved_by_a_person(engine)
    with transaction(engine) as s:
        held = s.exec(select(Transition)).one()
        assert held.status is TransitionStatus.pending
        assert {g["gate"]: g["passed"] for g in held.gate_results}["shadow_report"] is False
    _log(tmp_path, n=300)
    result = evaluate(engine, sink, str(tmp_path), "fraud", 2)
    assert result.approved == [tid]
    assert sink.events[-1].event == "stagegate.transition.approved"


def test_reconcile_decides_a_report_whose_flow_never_ran(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    """The `applied` event was lost or the flow died: reconcile's pass decides the report,
    and the transition waiting on it is approved, exactly once however often it runs."""
    _setup(factory, engine, Stage.shadow)
    tid = _request_canary_approved_by_a_person(engine)
    _log(tmp_path, n=300)
    plane = DataPlane(FakeBackend(), router_url=None, log_url=str(tmp_path))
    report = reconcile(engine, FakeRegistry(), sink, plane, stale_after_s=3600)
    assert report.evaluated == ["fraud/2: shadow passed"]
    with transaction(engine) as s:
        assert transitions.get_transition(s, tid).status is TransitionStatus.approved
    again = reconcile(engine, FakeRegistry(), sink, plane, stale_after_s=3600)
    assert again.evaluated == ["fraud/2: shadow passed"]
    with transaction(engine) as s:
        assert len(evaluations.list_for(s, "fraud", 2)) == 1


def test_client_errors_are_not_model_errors(tmp_path: Path) -> None:
    """A caller sending bad input (4xx) must not be able to fail a canary or a shadow."""
    _log(tmp_path / "bad-input", n=50, shadow_status=400)
    _log(tmp_path / "broken", n=50, shadow_status=503)
    since = utcnow() - timedelta(minutes=1)

    def arm_errors(root: Path) -> float:
        c = compare(
            str(root),
            "fraud",
            arm_version=2,
            role=DeploymentRole.shadow,
            champion_version=1,
            since=since,
        )
        return c.arm.error_rate

    assert arm_errors(tmp_path / "bad-input") == 0.0
    assert arm_errors(tmp_path / "broken") == 1.0
