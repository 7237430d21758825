"""Many candidates, one shadow slot: they queue in a stated order, first approved, first
served, whatever order the gates happen to be re-run in."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine

from stagegate.db import transaction, utcnow
from stagegate.governance import transitions
from stagegate.governance.models import TransitionStatus
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role, Stage
from tests.factories import Factory

ALICE = Principal("alice", Role.approver)
DANA = Principal("dana", Role.author)


def _request(engine: Engine, version: int) -> str:
    with transaction(engine) as s:
        t, _ = transitions.request(
            s,
            principal=DANA,
            model="m",
            version=version,
            to_stage=Stage.shadow,
            reason="queue",
            now=utcnow(),
        )
        return t.id


def _approve(engine: Engine, tid: str, at_s: float) -> None:
    with transaction(engine) as s:
        transitions.decide(
            s,
            principal=ALICE,
            transition_id=tid,
            decision="approve",
            comment=None,
            now=utcnow() + timedelta(seconds=at_s),
        )


def _regate(engine: Engine, *ids: str) -> dict[str, tuple[TransitionStatus, str]]:
    out = {}
    for tid in ids:
        with transaction(engine) as s:
            t = transitions.reevaluate(s, transition_id=tid, now=utcnow(), actor="stagegate")
            gate = {g["gate"]: g for g in t.gate_results}["stage_free"]
            out[tid] = (t.status, gate["reason"])
    return out


def test_candidates_queue_for_the_shadow_slot_first_approved_first_served(
    engine: Engine, factory: Factory
) -> None:
    for v in (1, 2, 3, 4):
        factory.version("m", v, creator="erin")
    factory.place("m", 1, Stage.production)
    factory.place("m", 2, Stage.shadow)
    # v4 asks first, but v3 is approved first: v3 is first in the queue.
    t4 = _request(engine, 4)
    t3 = _request(engine, 3)
    _approve(engine, t3, 0)
    _approve(engine, t4, 1)
    with transaction(engine) as s:
        held = transitions.get_transition(s, t4)
        assert held.status is TransitionStatus.pending
        assert (
            "v2 is in shadow" in {g["gate"]: g for g in held.gate_results}["stage_free"]["reason"]
        )

    factory.place("m", 2, Stage.rejected)  # the slot frees up
    # Re-run in the "wrong" order: v4 first. It still waits for v3.
    after = _regate(engine, t4, t3)
    assert after[t4][0] is TransitionStatus.pending
    assert "1 ahead in the queue for shadow (first approved, first served): v3" in after[t4][1]
    assert after[t3] == (TransitionStatus.approved, "shadow is free")
    # v3 takes the slot; v4 now waits for the occupant, then gets it once v3 moves on.
    factory.place("m", 3, Stage.shadow)
    with transaction(engine) as s:
        t = transitions.get_transition(s, t3)
        t.status = TransitionStatus.applied
        s.add(t)
    assert "v3 is in shadow" in _regate(engine, t4)[t4][1]
    factory.place("m", 3, Stage.canary)
    assert _regate(engine, t4)[t4][0] is TransitionStatus.approved
