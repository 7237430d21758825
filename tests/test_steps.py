"""The idempotent steps behind the flows: intake, apply and reconcile."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import select

from stagegate.db import transaction, utcnow
from stagegate.events.sink import MemorySink
from stagegate.governance import audit, evaluations, transitions, versions
from stagegate.governance.models import Transition, TransitionStatus
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role, Stage
from stagegate.steps.apply import apply_transition
from stagegate.steps.converge import DataPlane
from stagegate.steps.intake import intake
from stagegate.steps.reconcile import reconcile
from tests.fakes import FakeBackend, FakeRegistry

ALICE = Principal("alice", Role.approver)


def _plane() -> DataPlane:
    return DataPlane(FakeBackend(), router_url=None)


def test_intake_records_lineage_and_opens_one_transition(engine: Engine, sink: MemorySink) -> None:
    reg = FakeRegistry()
    reg.add("fraud", 1)
    first = intake(engine, reg, sink, "fraud", 1)
    again = intake(engine, reg, sink, "fraud", 1)  # a redelivered event, a retried flow
    assert first.recorded
    assert not again.recorded
    assert first.transition_id == again.transition_id
    with transaction(engine) as s:
        v = versions.get_version(s, "fraud", 1)
        assert v.stage is Stage.candidate
        assert v.digest == reg.digests[("fraud", 1)]
        assert versions.dataset_count(s, v.id) == 1
        assert len(s.exec(select(Transition)).all()) == 1
        assert audit.verify(s).ok
    assert reg.stage_tags[("fraud", 1)] == "candidate"
    assert sink.events == []  # the default policy needs an approval first


def test_reconcile_intakes_missed_versions_and_applies_stale_approvals(
    engine: Engine, sink: MemorySink
) -> None:
    reg = FakeRegistry()
    reg.add("fraud", 1)
    reg.add("fraud", 2)
    report = reconcile(engine, reg, sink, _plane(), stale_after_s=0)
    assert report.intaken == ["fraud/1", "fraud/2"]
    assert report.errors == []

    # An approval whose event got lost: reconcile applies it once it is stale.
    with transaction(engine) as s:
        t = s.exec(select(Transition).where(Transition.version == 1)).one()
        transitions.decide(
            s,
            principal=ALICE,
            transition_id=t.id,
            decision="approve",
            comment=None,
            now=utcnow() - timedelta(minutes=5),
        )
        t.decided_at = utcnow() - timedelta(minutes=5)
        s.add(t)
    report = reconcile(engine, reg, sink, _plane(), stale_after_s=60)
    assert report.applied == [f"{t.id}: applied"]
    with transaction(engine) as s:
        assert versions.get_version(s, "fraud", 1).stage is Stage.shadow


def _approve(engine: Engine, tid: str) -> Transition:
    with transaction(engine) as s:
        return transitions.decide(
            s, principal=ALICE, transition_id=tid, decision="approve", comment=None, now=utcnow()
        )


def _leave_shadow(engine: Engine, reg: FakeRegistry, version: int) -> None:
    with transaction(engine) as s:
        t, _ = transitions.request(
            s,
            principal=Principal("erin", Role.author),
            model="fraud",
            version=version,
            to_stage=Stage.rejected,
            reason="x",
            now=utcnow(),
        )
    _approve(engine, t.id)
    assert apply_transition(engine, reg, t.id).status is TransitionStatus.applied


def _two_candidates(engine: Engine, sink: MemorySink) -> tuple[FakeRegistry, str, str]:
    reg = FakeRegistry()
    for v in (1, 2):
        reg.add("fraud", v)
        intake(engine, reg, sink, "fraud", v)
    with transaction(engine) as s:
        t1, t2 = s.exec(select(Transition).order_by(Transition.version)).all()
    return reg, t1.id, t2.id


def test_a_held_stage_keeps_the_transition_pending_until_reconcile_sees_it_free(
    engine: Engine, sink: MemorySink
) -> None:
    reg, t1, t2 = _two_candidates(engine, sink)
    _approve(engine, t1)
    apply_transition(engine, reg, t1)
    held = _approve(engine, t2)
    assert held.status is TransitionStatus.pending
    assert {g["gate"]: g["passed"] for g in held.gate_results} == {
        "approvals": True,
        "stage_free": False,
    }
    _leave_shadow(engine, reg, 1)
    report = reconcile(engine, reg, sink, _plane(), stale_after_s=3600)
    assert report.approved == [t2]
    approved = [e for e in sink.events if e.event == "stagegate.transition.approved"]
    assert approved[-1].resource["stagegate.transition.id"] == t2


def test_two_approvals_racing_for_one_slot_defer_the_second(
    engine: Engine, sink: MemorySink
) -> None:
    reg, t1, t2 = _two_candidates(engine, sink)
    _approve(engine, t1)
    _approve(engine, t2)  # approved second: it queues behind t1 for the free slot
    with transaction(engine) as s:
        queued = transitions.get_transition(s, t2)
        assert queued.status is TransitionStatus.pending
        assert "ahead in the queue for shadow" in queued.gate_results[-1]["reason"] or any(
            "ahead in the queue" in g["reason"] for g in queued.gate_results
        )
        # Two evaluations racing in separate processes could still approve both: apply
        # checks the slot again, as the last line of defence.
        queued.status = TransitionStatus.approved
        s.add(queued)
    assert apply_transition(engine, reg, t1).status is TransitionStatus.applied
    deferred = apply_transition(engine, reg, t2)
    assert deferred.status is TransitionStatus.pending
    assert "v1 is already in shadow" in (deferred.reason or "")
    with transaction(engine) as s:
        assert versions.get_version(s, "fraud", 2).stage is Stage.candidate
        assert audit.verify(s).ok


def test_concurrent_approvals_see_each_other(engine: Engine, sink: MemorySink) -> None:
    """Two approvers deciding at the same instant must not leave the transition stuck."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.factories import Factory

    Factory(engine).version("fraud", 1)
    with transaction(engine) as s:
        v = versions.get_version(s, "fraud", 1)
        v.stage = Stage.canary
        s.add(v)
        evaluations.record(
            s,
            model="fraud",
            version=1,
            kind="canary",
            passed=True,
            reason="ok",
            sample_size=500,
            summary={},
            window_start=utcnow(),
            actor="test",
        )
        t, _ = transitions.request(
            s,
            principal=Principal("erin", Role.author),
            model="fraud",
            version=1,
            to_stage=Stage.production,
            reason="x",
            now=utcnow(),
        )

    def approve(name: str) -> None:
        with transaction(engine) as s:
            transitions.decide(
                s,
                principal=Principal(name, Role.approver),
                transition_id=t.id,
                decision="approve",
                comment=None,
                now=utcnow(),
            )

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(approve, ["alice", "bob"]))
    with transaction(engine) as s:
        assert transitions.get_transition(s, t.id).status is TransitionStatus.approved


def test_reconcile_repairs_the_registry_mirror_and_skips_unsupported_names(
    engine: Engine, sink: MemorySink
) -> None:
    reg = FakeRegistry()
    reg.add("fraud", 1)
    reg.add("bad name!", 1)  # MLflow allows it; Stagegate's names are stricter
    report = reconcile(engine, reg, sink, _plane(), stale_after_s=3600)
    assert report.skipped == ["bad name!/1: unsupported model name"]
    with transaction(engine) as s:
        t = s.exec(select(Transition)).one()
    _approve(engine, t.id)
    apply_transition(engine, reg, t.id)
    reg.aliases["fraud"] = {"champion": 1}  # someone edited aliases by hand in MLflow
    reg.stage_tags[("fraud", 1)] = "production"
    reconcile(engine, reg, sink, _plane(), stale_after_s=3600)
    assert reg.aliases["fraud"] == {"shadow": 1}
    assert reg.stage_tags[("fraud", 1)] == "shadow"


def test_apply_reruns_the_gates_an_expired_approval_sends_it_back(
    engine: Engine, sink: MemorySink
) -> None:
    """Approved eight days ago, applied late (a lost event, a stopped worker): the approval
    has expired since, so the stage does not move and the transition waits for a new one."""
    reg, t1, _ = _two_candidates(engine, sink)
    long_ago = utcnow() - timedelta(days=8)
    with transaction(engine) as s:
        approved = transitions.decide(
            s, principal=ALICE, transition_id=t1, decision="approve", comment=None, now=long_ago
        )
    assert approved.status is TransitionStatus.approved
    result = apply_transition(engine, reg, t1)
    assert result.status is TransitionStatus.pending
    assert result.reason is not None
    assert result.reason.startswith("gates failed at apply: approvals:")
    with transaction(engine) as s:
        assert versions.get_version(s, "fraud", 1).stage is Stage.candidate
        assert audit.verify(s).ok
    # A fresh approval (from another approver) brings it back, and then it applies.
    with transaction(engine) as s:
        fresh = transitions.decide(
            s,
            principal=Principal("bob", Role.approver),
            transition_id=t1,
            decision="approve",
            comment=None,
            now=utcnow(),
        )
    assert fresh.status is TransitionStatus.approved
    assert apply_transition(engine, reg, t1).status is TransitionStatus.applied
