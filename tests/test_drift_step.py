"""The drift check step on a real database: evaluations bound to digest and window, alarms,
and each action once per alarm. The reference and the current window are Arrow tables made
here (the inference log's reader and the registry's reference loader have their own tests)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pytest
from sqlalchemy.engine import Engine

from stagegate.db import transaction, utcnow
from stagegate.errors import NoReference
from stagegate.events.sink import MemorySink
from stagegate.governance import alarms, audit, evaluations, transitions, versions
from stagegate.governance.models import TransitionStatus
from stagegate.governance.policies import get_policy, set_policy
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.policy import DriftActions, DriftCriteria
from stagegate.lifecycle.stages import Role, Stage
from stagegate.steps.drift import DRIFT_EVENT, Monitor, check_version, targets, window
from tests.factories import Factory

ROWS = 2000


def frame(
    seed: int, *, shift: float = 0.0, new_category: bool = False, rows: int = ROWS
) -> pa.Table:
    rng = np.random.default_rng(seed)
    cats = np.array(["a", "b", "c"])[rng.integers(0, 3, rows)]
    if new_category:
        cats[: rows // 2] = "z"
    return pa.table(
        {
            "amount": rng.normal(100 + shift, 10, rows),
            "age": rng.normal(40, 5, rows),
            "channel": pa.array(cats),
        }
    )


class World:
    """A model `fraud` with v1 retired and v2 in production, a permissive policy, and a
    current window the test chooses."""

    def __init__(self, engine: Engine, factory: Factory, sink: MemorySink, tmp: str) -> None:
        self.engine, self.sink = engine, sink
        self.current = frame(2)
        self.reference: pa.Table | None = frame(1)
        factory.version("fraud", 1)
        factory.version("fraud", 2)
        factory.version("fraud", 3)
        factory.place("fraud", 1, Stage.production)
        factory.place("fraud", 1, Stage.retired)
        factory.place("fraud", 2, Stage.production)
        factory.place("fraud", 3, Stage.canary)
        self.monitor = Monitor(
            engine=engine,
            sink=sink,
            log_url=tmp,
            load_reference=self._reference,
            read_current=lambda m, v, s, e, c: self.current,
        )
        self.drift(min_rows=100, html_report=False)

    def _reference(self, model: str, version: int) -> pa.Table:
        if self.reference is None:
            raise NoReference("no stagegate/reference artifact and no readable dataset source")
        return self.reference

    def drift(self, **changes: object) -> None:
        with transaction(self.engine) as s:
            policy = get_policy(s, "fraud")
            drift = policy.drift.model_copy(update=changes)
            set_policy(s, "fraud", policy.model_copy(update={"drift": drift}), actor="test")

    def check(self, until: datetime | None = None, version: int = 2):  # type: ignore[no-untyped-def]
        return check_version(self.monitor, "fraud", version, until=until)


@pytest.fixture
def world(engine: Engine, factory: Factory, sink: MemorySink, tmp_path) -> World:  # type: ignore[no-untyped-def]
    return World(engine, factory, sink, str(tmp_path))


def _drift_evaluations(engine: Engine, version: int = 2) -> list:  # type: ignore[type-arg]
    with transaction(engine) as s:
        return [e for e in evaluations.list_for(s, "fraud", version) if e.kind == "drift"]


def test_windows_end_on_the_interval_so_a_recheck_is_the_same_window() -> None:
    c = DriftCriteria(window_s=3600, interval_s=600)
    start, end = window(c, datetime(2026, 11, 30, 10, 17, 5, tzinfo=UTC), aligned=True)
    assert end == datetime(2026, 11, 30, 10, 10, tzinfo=UTC)
    assert start == end - timedelta(hours=1)
    again = window(c, datetime(2026, 11, 30, 10, 19, 59, tzinfo=UTC), aligned=True)
    assert again == (start, end)
    exact = window(c, datetime(2026, 11, 30, 10, 17, 5, tzinfo=UTC), aligned=False)
    assert exact[1] == datetime(2026, 11, 30, 10, 17, 5, tzinfo=UTC)


def test_a_clean_window_is_recorded_once_bound_to_digest_and_window(world: World) -> None:
    first = world.check()
    assert first.verdict == "ok", first.reason
    assert first.recorded
    assert first.alarm_id is None
    assert not world.sink.events
    again = world.check()
    assert not again.recorded
    assert again.evaluation_id == first.evaluation_id
    [e] = _drift_evaluations(world.engine)
    with transaction(world.engine) as s:
        digest = versions.get_version(s, "fraud", 2).digest
    assert e.digest == digest
    assert (e.window_start, e.window_end) == (first.window_start, first.window_end)
    assert e.sample_size == ROWS
    scores = {c["column"]: c for c in e.summary["columns"]}
    assert set(scores) == {"amount", "age", "channel"}
    assert all(c["test"] and c["score"] is not None for c in scores.values())


def test_drift_opens_one_alarm_and_emits_one_event_per_alarm(world: World) -> None:
    world.current = frame(2, shift=30, new_category=True)
    first = world.check()
    assert first.verdict == "drift"
    assert set(first.drifted_features) == {"amount", "channel"}
    assert first.alarm_id is not None
    [event] = [e for e in world.sink.events if e.event == DRIFT_EVENT]
    assert event.resource["prefect.resource.id"] == "stagegate.model.fraud.2"
    assert event.payload["drifted_features"] == first.drifted_features
    assert event.payload["alarm_id"] == first.alarm_id

    # The same window again, and a later window while the alarm is open: no new action.
    world.check()
    later = world.check(until=utcnow() + timedelta(minutes=5))
    assert later.recorded
    assert later.alarm_id == first.alarm_id
    assert later.actions == {"event": "emitted before"}
    assert len([e for e in world.sink.events if e.event == DRIFT_EVENT]) == 1
    with transaction(world.engine) as s:
        [alarm] = alarms.list_for(s, "fraud", 2)
        assert alarm.last_evaluation_id == later.evaluation_id
        opened = [
            r
            for r in audit.entries(s, entity_id="fraud/2", offset=0, limit=100)
            if r.action == "drift.alarm_opened"
        ]
    assert len(opened) == 1
    assert len(_drift_evaluations(world.engine)) == 2


def test_no_reference_and_too_little_data_are_verdicts_without_alarms(world: World) -> None:
    world.reference = None
    none = world.check()
    assert none.verdict == "no reference"
    assert "no stagegate/reference artifact" in none.reason
    world.reference = frame(1)
    world.current = frame(2, shift=30, rows=20)  # fewer than min_rows
    tiny = world.check(until=utcnow() + timedelta(minutes=1))
    assert tiny.verdict == "insufficient data"
    assert "min_rows=100" in tiny.reason
    assert not world.sink.events
    with transaction(world.engine) as s:
        assert alarms.list_for(s, "fraud") == []


def test_drift_rollback_waits_for_approval_then_restores_the_previous_champion(
    world: World, factory: Factory
) -> None:
    world.drift(actions=DriftActions(rollback=True, emit_event=False))
    world.current = frame(2, shift=30, new_category=True)
    outcome = world.check()
    with transaction(world.engine) as s:
        [alarm] = alarms.list_for(s, "fraud", 2)
        t = transitions.get_transition(s, alarm.rollback_transition_id or "")
    assert t.status is TransitionStatus.pending
    assert (t.from_stage, t.to_stage, t.requested_by) == (
        Stage.production,
        Stage.rolled_back,
        "stagegate",
    )
    assert outcome.actions["rollback"].startswith("pending")
    assert world.check().actions["rollback"].startswith("opened before")  # one per alarm

    with transaction(world.engine) as s:
        transitions.decide(
            s,
            principal=Principal("ava", Role.approver),
            transition_id=t.id,
            decision="approve",
            comment="drift confirmed",
            now=utcnow(),
        )
        assert transitions.get_transition(s, t.id).status is TransitionStatus.approved
        transitions.apply(
            s, transition_id=t.id, actor="stagegate", current_digest=None, now=utcnow()
        )
    with transaction(world.engine) as s:
        assert versions.get_version(s, "fraud", 2).stage is Stage.rolled_back
        assert versions.get_version(s, "fraud", 1).stage is Stage.production


def test_a_drift_rollback_applies_alone_only_when_the_policy_says_and_only_for_the_service(
    world: World,
) -> None:
    # A person's own rollback request gets no shortcut from the open alarm.
    world.drift(actions=DriftActions(rollback=False, rollback_applies_alone=True, emit_event=False))
    world.current = frame(2, shift=30, new_category=True)
    world.check()
    with transaction(world.engine) as s:
        mine, _ = transitions.request(
            s,
            principal=Principal("root", Role.admin),
            model="fraud",
            version=2,
            to_stage=Stage.rolled_back,
            reason="me too",
            now=utcnow(),
        )
        assert mine.status is TransitionStatus.pending
        s.delete(mine)
    world.drift(actions=DriftActions(rollback=True, rollback_applies_alone=True, emit_event=False))
    outcome = world.check(until=utcnow() + timedelta(minutes=1))
    assert outcome.actions["rollback"].startswith("approved")
    approved = [e for e in world.sink.events if e.event == "stagegate.transition.approved"]
    assert len(approved) == 1  # the promote flow applies it
    with transaction(world.engine) as s:
        [alarm] = alarms.list_for(s, "fraud", 2)
        t = transitions.get_transition(s, alarm.rollback_transition_id or "")
    gate = next(g for g in t.gate_results if g["gate"] == "approvals")
    assert "applies alone by policy" in gate["reason"]


def test_an_open_alarm_on_the_champion_blocks_other_promotions_until_acknowledged(
    world: World,
) -> None:
    world.drift(actions=DriftActions(block_promotions=True, emit_event=False))
    world.current = frame(2, shift=30, new_category=True)
    outcome = world.check()
    with transaction(world.engine) as s:
        t, _ = transitions.request(
            s,
            principal=Principal("stagegate", Role.service),
            model="fraud",
            version=3,
            to_stage=Stage.production,
            reason="v3 is better",
            now=utcnow(),
        )
        tid = t.id
    held = next(g for g in t.gate_results if g["gate"] == "drift_alarm")
    assert not held["passed"]
    assert "open drift alarm" in held["reason"]
    with transaction(world.engine) as s, pytest.raises(Exception, match="may not acknowledge"):
        alarms.acknowledge(
            s,
            principal=Principal("viv", Role.viewer),
            alarm_id=outcome.alarm_id or "",
            comment=None,
            now=utcnow(),
        )
    with transaction(world.engine) as s:
        alarms.acknowledge(
            s,
            principal=Principal("ava", Role.approver),
            alarm_id=outcome.alarm_id or "",
            comment="known seasonal shift",
            now=utcnow(),
        )
    with transaction(world.engine) as s:
        t = transitions.reevaluate(s, transition_id=tid, now=utcnow(), actor="test")
    passed = next(g for g in t.gate_results if g["gate"] == "drift_alarm")
    assert passed["passed"], passed["reason"]
    # The acknowledged window checked again sets off nothing; later drift opens a new alarm.
    same = world.check()
    assert same.alarm_id == outcome.alarm_id
    assert same.actions == {}
    again = world.check(until=utcnow() + timedelta(minutes=1))
    assert again.alarm_id not in (None, outcome.alarm_id)


def test_targets_follow_each_models_policy(world: World) -> None:
    assert targets(world.engine) == [("fraud", 2)]
    world.drift(stages=frozenset({Stage.production, Stage.canary}))
    assert targets(world.engine) == [("fraud", 2), ("fraud", 3)]


def test_intake_records_where_the_reference_comes_from(engine: Engine, sink: MemorySink) -> None:
    from stagegate.steps.intake import intake
    from tests.fakes import FakeRegistry

    reg = FakeRegistry()
    reg.add("fraud", 1)
    reg.add("fraud", 2)
    reg.references[("fraud", 2)] = frame(1)
    intake(engine, reg, sink, "fraud", 1)
    intake(engine, reg, sink, "fraud", 2)
    with transaction(engine) as s:
        first = versions.get_version(s, "fraud", 1).reference_source
        second = versions.get_version(s, "fraud", 2).reference_source
    assert first == reg.describe_reference("fraud", 1)  # its dataset's source, or None
    assert second == "runs:/run2/stagegate/reference"


def test_the_logged_window_is_typed_and_carries_each_requests_latest_label(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """What the flow checks: the version's decoded rows in [start, end), joined by request id
    with the latest feedback label, so performance is measured on real logged traffic."""
    import orjson

    from stagegate.serving.inference_log.records import InferenceRecord
    from stagegate.serving.inference_log.writer import LabelRecord, LocalInferenceLog, attach_labels
    from stagegate.steps.drift import read_logged

    root = str(tmp_path / "log")
    t0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    log = LocalInferenceLog(root)
    for i in range(4):
        body = {"dataframe_split": {"columns": ["amount", "channel"], "data": [[10.0 * i, "web"]]}}
        log.append(
            InferenceRecord(
                request_id=f"r{i}",
                model="fraud",
                version=2 if i < 3 else 1,  # r3 was answered by another version
                role="champion",
                key_hash=None,
                inputs=body,
                output=[i % 2],  # as the router logs it: the predictions
                status=200,
                latency_ms=1.0,
                at=t0 + timedelta(minutes=i),
                body=orjson.dumps(body),
                content_type="application/json",
            )
        )
    log.close()
    attach_labels(
        root,
        [
            LabelRecord("r0", "fraud", 0, t0 + timedelta(hours=1)),
            LabelRecord("r1", "fraud", 0, t0 + timedelta(hours=1)),
            LabelRecord("r1", "fraud", 1, t0 + timedelta(hours=2)),  # supersedes the first
            LabelRecord("r2", "fraud", "yes", t0 + timedelta(hours=1)),  # another kind
        ],
    )
    c = DriftCriteria(label_column="label", prediction_column="prediction")
    window = read_logged(root, "fraud", 2, t0, t0 + timedelta(minutes=2), c)
    assert window.column("request_id").to_pylist() == ["r0", "r1"]  # r2 is past the end
    assert window.column("amount").to_pylist() == [0.0, 10.0]
    assert window.column("channel").to_pylist() == ["web", "web"]
    assert window.column("prediction").to_pylist() == [0, 1]
    assert window.column("label").to_pylist() == [0, 1]
    mixed = read_logged(root, "fraud", 2, t0, t0 + timedelta(hours=1), c)
    assert mixed.column("label").to_pylist() == ["0", "1", "yes"]  # compared as text
