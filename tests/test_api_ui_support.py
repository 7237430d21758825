"""The API the web UI reads: who am I, what may I decide (the verdict `decide` itself applies),
the fleet in a fixed number of queries, deployment history, audit filters and model cards."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import markdown as python_markdown
import pytest
from fastapi.testclient import TestClient
from markdown_it import MarkdownIt
from sqlalchemy import event
from sqlalchemy.engine import Engine

from stagegate.db import transaction, utcnow
from stagegate.governance import (
    alarms,
    audit,
    authorship,
    endpoints,
    evaluations,
    identities,
    policies,
    tokens,
    transitions,
    versions,
)
from stagegate.governance.models import Transition, TransitionStatus
from stagegate.governance.tokens import Principal
from stagegate.lifecycle import decisions
from stagegate.lifecycle.gates import AuthorFacts
from stagegate.lifecycle.policy import default_policy
from stagegate.lifecycle.stages import Role, Stage
from stagegate.steps.apply import apply_transition
from tests.factories import Factory, auth
from tests.fakes import FakeRegistry

Json = dict[str, Any]
REGISTERED = datetime(2026, 1, 1, tzinfo=UTC)  # the factory's registration time


def _move(engine: Engine, name: str, version: int, to: Stage, when: datetime) -> str:
    """An applied move at `when`, written as apply writes it (transition row, deployment
    windows, the endpoint's desired state), without gates: for figures about time."""
    with transaction(engine) as s:
        row = versions.get_version(s, name, version, lock=True)
        t = Transition(
            model_name=name,
            version=version,
            from_stage=row.stage,
            to_stage=to,
            reason=f"moved to {to} by the test",
            requested_by="factory",
            status=TransitionStatus.applied,
            created_at=when,
            decided_at=when,
            applied_at=when,
        )
        s.add(t)
        s.flush()
        if to is Stage.production and (old := versions.holder(s, name, Stage.production)):
            transitions._move(s, old, Stage.retired, t, when, "none", [])
        transitions._move(s, row, to, t, when, "none", [])
        endpoints.desire(s, name, actor="test")
        return t.id


def _request(engine: Engine, who: Principal, name: str, version: int, to: Stage) -> str:
    with transaction(engine) as s:
        t, _ = transitions.request(
            s, principal=who, model=name, version=version, to_stage=to, reason="ready", now=utcnow()
        )
        return t.id


def _decide(engine: Engine, who: Principal, tid: str, decision: str, when: datetime) -> None:
    with transaction(engine) as s:
        transitions.decide(
            s,
            principal=who,
            transition_id=tid,
            decision=decision,  # type: ignore[arg-type]
            comment=f"{decision} by the test",
            now=when,
        )


@contextmanager
def _statements(engine: Engine) -> Iterator[list[str]]:
    """The SQL statements run on `engine` inside the block."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


# -- /me --------------------------------------------------------------------------------------


def test_me_names_the_caller_role_linked_mlflow_users_and_expiry(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    with transaction(engine) as s:
        secret = tokens.create_token(
            s, name="alice", role=Role.approver, expires_in=timedelta(days=3)
        )
    factory.token("root", "admin")
    with transaction(engine) as s:
        identities.link(s, identity="alice", mlflow_user="alice.w", actor="root")
        identities.link(s, identity="alice", mlflow_user="a-laptop", actor="root")
    r = client.get("/api/v1/me", headers=auth(secret))
    assert r.status_code == 200, r.text
    me = r.json()
    assert (me["name"], me["role"], me["mlflow_users"]) == (
        "alice",
        "approver",
        ["a-laptop", "alice.w"],
    )
    expires = datetime.fromisoformat(me["expires_at"])
    assert timedelta(days=3) - timedelta(minutes=1) < expires - utcnow() <= timedelta(days=3)
    # A token without expiry says so; another identity sees only itself.
    viewer = client.get("/api/v1/me", headers=factory.token("vic", "viewer")).json()
    assert viewer == {"name": "vic", "role": "viewer", "mlflow_users": [], "expires_at": None}


# -- allowed_actions: the API's refusal is the verdict shown ---------------------------------


@dataclass
class World:
    heads: dict[str, dict[str, str]]
    ids: dict[str, str]


@pytest.fixture
def world(factory: Factory, engine: Engine) -> World:
    """Transitions in each state a refusal needs:

    - `open`: fraud v1 candidate->shadow, requested by root; v1's MLflow author is linked to carl
    - `blocked`: ranker v1, whose MLflow author is linked to no one, under unmapped_author: block
    - `lapsed`: pricing v1 needing two approvals; alice approved 8 days ago, bob today
    - `closed`: fraud v2, rejected by alice
    - `moved`: churn v1 requested from candidate, since placed in shadow
    - `unattested`: scoring v1 under authorship: attested, which nobody has attested
    - `attested`: credit v1 under authorship: attested, attested by bob
    """
    heads = {
        name: factory.token(name, role)
        for name, role in [
            ("root", "admin"),
            ("erin", "author"),
            ("alice", "approver"),
            ("bob", "approver"),
            ("carl", "approver"),
            ("vic", "viewer"),
            ("svc", "service"),
        ]
    }
    factory.version("fraud", 1, creator="ds-carl")
    factory.version("fraud", 2)
    factory.version("ranker", 1, creator="ghost")
    factory.version("pricing", 1)
    factory.version("churn", 1)
    factory.version("scoring", 1)
    factory.version("credit", 1)
    two = default_policy()
    two = two.model_copy(
        update={
            "approvals": [
                r.model_copy(update={"required": 2}) if Stage.shadow in r.to_stages else r
                for r in two.approvals
            ]
        }
    )
    with transaction(engine) as s:
        identities.link(s, identity="carl", mlflow_user="ds-carl", actor="root")
        policies.set_policy(s, "pricing", two, actor="test")
        policies.set_policy(
            s, "ranker", default_policy().model_copy(update={"unmapped_author": "block"}), actor="t"
        )
        attested = default_policy().model_copy(update={"authorship": "attested"})
        policies.set_policy(s, "scoring", attested, actor="t")
        policies.set_policy(s, "credit", attested, actor="t")
        authorship.attest(
            s, principal=Principal("bob", Role.approver), model="credit", version=1, now=utcnow()
        )
    root, erin = Principal("root", Role.admin), Principal("erin", Role.author)
    alice, bob = Principal("alice", Role.approver), Principal("bob", Role.approver)
    ids = {
        "open": _request(engine, root, "fraud", 1, Stage.shadow),
        "blocked": _request(engine, erin, "ranker", 1, Stage.shadow),
        "lapsed": _request(engine, erin, "pricing", 1, Stage.shadow),
        "closed": _request(engine, erin, "fraud", 2, Stage.shadow),
        "moved": _request(engine, erin, "churn", 1, Stage.shadow),
        "unattested": _request(engine, erin, "scoring", 1, Stage.shadow),
        "attested": _request(engine, erin, "credit", 1, Stage.shadow),
    }
    _decide(engine, alice, ids["lapsed"], "approve", utcnow() - timedelta(days=8))
    _decide(engine, bob, ids["lapsed"], "approve", utcnow())
    _decide(engine, alice, ids["closed"], "reject", utcnow())
    factory.place("churn", 1, Stage.shadow)
    return World(heads, ids)


REFUSALS = [
    # (case, caller, transition, decision, status, what the reason must say)
    ("own request", "root", "open", "approve", 403, "the requester of a transition may not"),
    ("author through a link", "carl", "open", "approve", 403, "linked to carl"),
    ("author rejecting too", "carl", "open", "reject", 403, "is the author of fraud v1"),
    ("role not in the rule", "erin", "open", "approve", 403, "role author cannot decide"),
    ("viewer at the route", "vic", "open", "approve", 403, "role viewer may not do this"),
    ("service at the route", "svc", "open", "reject", 403, "role service may not do this"),
    ("unmapped author blocked", "alice", "blocked", "approve", 403, "the policy blocks"),
    ("not attested", "alice", "unattested", "approve", 403, "waiting for the author's attest"),
    ("the attester", "bob", "attested", "approve", 403, "bob attested authorship of credit"),
    ("expired, then again", "alice", "lapsed", "approve", 409, "its approver cannot renew it"),
    ("expired, then reject", "alice", "lapsed", "reject", 409, "expired at"),
    ("already decided", "bob", "lapsed", "approve", 409, "bob already decided"),
    ("not pending", "bob", "closed", "approve", 409, "is rejected, not pending"),
    ("version moved", "bob", "moved", "approve", 409, "moved to shadow since"),
]


@pytest.mark.parametrize(
    ("caller", "which", "decision", "status", "says"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_a_refusal_is_the_reason_allowed_actions_showed(
    client: TestClient, world: World, caller: str, which: str, decision: str, status: int, says: str
) -> None:
    head, tid = world.heads[caller], world.ids[which]
    shown = client.get(f"/api/v1/transitions/{tid}", headers=head)
    assert shown.status_code == 200, shown.text
    verdict = shown.json()["allowed_actions"][decision]
    assert verdict["allowed"] is False
    assert says in verdict["reason"]
    # The list shows the same verdict (read in bulk) as the single transition.
    listed = client.get("/api/v1/transitions", params={"limit": 200}, headers=head).json()["data"]
    assert next(t for t in listed if t["id"] == tid)["allowed_actions"][decision] == verdict
    refused = client.post(
        f"/api/v1/transitions/{tid}/approvals", headers=head, json={"decision": decision}
    )
    assert refused.status_code == status, refused.text
    assert refused.json()["detail"] == verdict["reason"]


def test_an_allowed_action_is_taken_and_then_shown_as_decided(
    client: TestClient, world: World
) -> None:
    tid, alice = world.ids["open"], world.heads["alice"]
    before = client.get(f"/api/v1/transitions/{tid}", headers=alice).json()["allowed_actions"]
    assert before == {
        "approve": {"allowed": True, "reason": None},
        "reject": {"allowed": True, "reason": None},
    }
    # Under block, an unmapped author's version may still be rejected, not approved.
    blocked = client.get(f"/api/v1/transitions/{world.ids['blocked']}", headers=alice).json()
    assert blocked["allowed_actions"]["reject"] == {"allowed": True, "reason": None}
    decided = client.post(
        f"/api/v1/transitions/{tid}/approvals", headers=alice, json={"decision": "approve"}
    )
    assert decided.status_code == 201, decided.text
    after = decided.json()
    assert after["status"] == "approved"
    assert after["allowed_actions"]["approve"] == {
        "allowed": False,
        "reason": f"transition {tid} is approved, not pending",
    }


def test_the_verdict_is_pure_and_names_the_first_check_the_api_meets() -> None:
    """Facts in, verdict out: the checks run in the API's order, so the reason shown is the
    one the caller would get (the route's role check before the transition's state...)."""
    now = datetime(2026, 6, 10, tzinfo=UTC)
    facts = decisions.DecisionFacts(
        caller="alice",
        role=Role.approver,
        transition_id="t1",
        status="pending",
        model="fraud",
        version=1,
        from_stage=Stage.candidate,
        to_stage=Stage.shadow,
        version_stage=Stage.candidate,
        requested_by="erin",
        author=AuthorFacts(mlflow_user="ghost", identity=None, unmapped="block"),
        rule=default_policy().approval_rule(Stage.candidate, Stage.shadow),
        approval_ttl_days=7,
        prior=None,
        now=now,
    )
    both = decisions.allowed_actions(facts)
    assert both["reject"] == decisions.Verdict(True)
    assert both["approve"].refusal is decisions.Refusal.forbidden
    assert decisions.allowed_actions(facts) == both  # nothing but the facts decides
    lapsed = replace(
        facts,
        author=AuthorFacts("ghost", "gus", "block"),
        prior=decisions.PriorDecision("approve", now - timedelta(days=7)),
    )
    assert "expired at 2026-06-10 00:00 UTC" in str(decisions.verdict(lapsed, "approve").reason)
    fresh = replace(lapsed, prior=decisions.PriorDecision("approve", now - timedelta(days=6)))
    assert decisions.verdict(fresh, "reject").reason == "alice already decided transition t1"
    viewer_late = replace(facts, role=Role.viewer, status="applied", caller="erin")
    assert decisions.verdict(viewer_late, "approve").reason == (
        "role viewer may not do this (needs admin, approver, author)"
    )
    closed = replace(facts, status="applied", caller="erin")
    assert decisions.verdict(closed, "approve") == decisions.Verdict(
        False, "transition t1 is applied, not pending", decisions.Refusal.conflict
    )


def test_listing_transitions_costs_the_same_queries_for_one_or_many(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    head = factory.token("alice", "approver")
    erin = Principal("erin", Role.author)

    def listing() -> int:
        with _statements(engine) as seen:
            r = client.get("/api/v1/transitions", params={"limit": 200}, headers=head)
        assert r.status_code == 200
        return len(seen)

    factory.version("m0", 1)
    _request(engine, erin, "m0", 1, Stage.shadow)
    listing()  # the first call also verifies the token, which later calls find cached
    one = listing()
    for i in range(1, 10):
        factory.version(f"m{i}", 1, creator=f"author{i}")
        _request(engine, erin, f"m{i}", 1, Stage.shadow)
    assert listing() == one


# -- the fleet --------------------------------------------------------------------------------


def test_fleet_shows_live_versions_split_approvals_drift_lead_time_and_rejections(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    hours = {("fraud", 1): 1, ("ranker", 1): 3, ("pricing", 1): 2, ("pricing", 2): 10}
    for name, count in [("fraud", 4), ("ranker", 2), ("pricing", 2), ("churn", 1)]:
        for v in range(1, count + 1):
            factory.version(name, v)
    for (name, v), h in hours.items():
        _move(engine, name, v, Stage.canary, REGISTERED + timedelta(hours=h) - timedelta(minutes=5))
        _move(engine, name, v, Stage.production, REGISTERED + timedelta(hours=h))
    # pricing v1 went back to production after v2: its lead time is still its first promotion.
    _move(engine, "pricing", 1, Stage.rolled_back, REGISTERED + timedelta(hours=11))
    _move(engine, "fraud", 2, Stage.canary, REGISTERED + timedelta(hours=20))
    _move(engine, "fraud", 3, Stage.shadow, REGISTERED + timedelta(hours=21))
    _move(engine, "ranker", 2, Stage.rejected, REGISTERED + timedelta(hours=22))
    erin, alice = Principal("erin", Role.author), Principal("alice", Role.approver)
    _request(engine, erin, "fraud", 4, Stage.shadow)
    churn = _request(engine, erin, "churn", 1, Stage.shadow)
    with transaction(engine) as s:
        transitions.decide(
            s,
            principal=alice,
            transition_id=churn,
            decision="reject",
            comment="bias in\nthe eval set",
            now=utcnow(),
        )
        drifted = evaluations.record(
            s, model="fraud", version=1, kind="drift", passed=False, reason="drift",
            sample_size=900, summary={}, window_start=REGISTERED, actor="test",
        )  # fmt: skip
        alarms.raise_alarm(s, drifted, ["amount"], actor="test")
        calm = evaluations.record(
            s, model="ranker", version=1, kind="drift", passed=True, reason="no drift",
            sample_size=900, summary={}, window_start=REGISTERED, actor="test",
        )  # fmt: skip

    r = client.get("/api/v1/fleet", headers=factory.token("vic", "viewer"))  # viewers read it
    assert r.status_code == 200, r.text
    fleet = r.json()
    by_name = {m["name"]: m for m in fleet["models"]}
    assert list(by_name) == ["churn", "fraud", "pricing", "ranker"]
    fraud = by_name["fraud"]
    assert fraud["versions"] == 4
    assert fraud["champion"] == {"version": 1, "since": "2026-01-01T01:00:00Z"}
    assert fraud["challenger"]["version"] == 2
    assert fraud["shadow"]["version"] == 3
    assert fraud["traffic"] == {"challenger_weight": 0.1, "shadow_fraction": 1.0}  # the default
    assert fraud["pending_approvals"] == 1
    assert fraud["drift"]["status"] == "drift"
    assert fraud["drift"]["open_alarms"] == 1
    assert by_name["ranker"]["drift"] == {
        "status": "ok",
        "open_alarms": 0,
        "last_checked": calm.created_at.isoformat().replace("+00:00", "Z"),
    }
    churn_row = by_name["churn"]
    assert churn_row["drift"] == {"status": "unchecked", "open_alarms": 0, "last_checked": None}
    assert churn_row["champion"] is None
    assert churn_row["pending_approvals"] == 0
    assert churn_row["traffic"] == {"challenger_weight": 0.0, "shadow_fraction": 0.0}
    assert by_name["pricing"]["champion"]["version"] == 2  # v1 rolled back, no restore
    assert fleet["pending_approvals"] == 1

    samples = [h * 3600.0 for h in hours.values()]
    lead = fleet["lead_time_s"]
    assert lead["samples"] == 4
    assert lead["median"] == pytest.approx(statistics.median(samples))
    assert lead["p90"] == pytest.approx(statistics.quantiles(samples, n=10, method="inclusive")[8])

    rejected = fleet["rejected"]
    assert rejected["versions"] == 2  # ranker v2 (moved to rejected), churn v1 (an approver)
    assert rejected["share"] == pytest.approx(2 / 9)
    assert rejected["reasons"] == [
        {"reason": "bias in the eval set", "count": 1},
        {"reason": "moved to rejected by the test", "count": 1},
    ]


def test_fleet_costs_the_same_queries_for_one_model_or_twenty(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    head = factory.token("vic", "viewer")
    erin = Principal("erin", Role.author)

    def add(name: str) -> None:
        factory.version(name, 1)
        factory.version(name, 2)
        _move(engine, name, 1, Stage.production, REGISTERED + timedelta(hours=1))
        _request(engine, erin, name, 2, Stage.shadow)

    def fleet() -> tuple[int, Json]:
        with _statements(engine) as seen:
            r = client.get("/api/v1/fleet", headers=head)
        assert r.status_code == 200, r.text
        return len(seen), r.json()

    add("m00")
    fleet()  # the first call also verifies the token, which later calls find cached
    one, body = fleet()
    assert len(body["models"]) == 1
    for i in range(1, 20):
        add(f"m{i:02d}")
    twenty, body = fleet()
    assert len(body["models"]) == 20
    assert body["pending_approvals"] == 20
    assert body["lead_time_s"]["samples"] == 20
    assert twenty == one


# -- deployment history -----------------------------------------------------------------------


def test_deployments_list_each_window_a_real_move_opened_oldest_first(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    registry = FakeRegistry()
    registry.add("fraud", 1)
    registry.digests[("fraud", 1)] = "ab" * 32
    factory.version("fraud", 1, digest="ab" * 32)
    erin, alice = factory.token("erin", "author"), factory.token("alice", "approver")
    bob = factory.token("bob", "approver")
    opened = []
    for to, approvers in [("shadow", [alice]), ("canary", [alice]), ("production", [alice, bob])]:
        if to != "shadow":
            with transaction(engine) as s:
                evaluations.record(
                    s, model="fraud", version=1, kind={"canary": "shadow"}.get(to, "canary"),
                    passed=True, reason="fine", sample_size=500, summary={},
                    window_start=utcnow(), actor="test",
                )  # fmt: skip
        t = client.post(
            "/api/v1/transitions",
            headers=erin,
            json={"model": "fraud", "version": 1, "to_stage": to, "reason": "ready"},
        ).json()
        for head in approvers:
            t = client.post(
                f"/api/v1/transitions/{t['id']}/approvals",
                headers=head,
                json={"decision": "approve"},
            ).json()
        assert t["status"] == "approved", t
        assert apply_transition(engine, registry, t["id"]).status == "applied"
        opened.append(t["id"])
    r = client.get("/api/v1/models/fraud/versions/1/deployments", headers=erin)
    assert r.status_code == 200, r.text
    windows = r.json()
    assert [w["role"] for w in windows] == ["shadow", "challenger", "champion"]
    assert [w["transition_id"] for w in windows] == opened
    assert all(w["digest"] == "ab" * 32 for w in windows)
    # Each window ends where the next begins; the champion's is still open.
    assert windows[0]["ended_at"] == windows[1]["started_at"]
    assert windows[1]["ended_at"] == windows[2]["started_at"]
    assert windows[2]["ended_at"] is None
    missing = client.get("/api/v1/models/fraud/versions/9/deployments", headers=erin)
    assert missing.status_code == 404


# -- audit filters ----------------------------------------------------------------------------


def test_audit_filters_by_action_actor_entity_and_time(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    head = factory.token("vic", "viewer")

    def write(actor: str, action: str, entity_type: str, entity_id: str) -> None:
        with transaction(engine) as s:
            audit.append(
                s, actor=actor, action=action, entity_type=entity_type, entity_id=entity_id
            )

    write("alice", "approval.approve", "transition", "t1")
    write("bob", "approval.reject", "transition", "t2")
    middle = utcnow()
    write("alice", "approval.reject", "transition", "t3")
    write("alice", "policy.set", "policy", "t1")

    def seqs(**params: str) -> list[tuple[str, str, str]]:
        r = client.get("/api/v1/audit", params=params, headers=head)
        assert r.status_code == 200, r.text
        return [(e["actor"], e["action"], e["entity_id"]) for e in r.json()["data"]]

    assert seqs(action="approval.reject") == [
        ("alice", "approval.reject", "t3"),
        ("bob", "approval.reject", "t2"),
    ]
    assert [a for a, _, _ in seqs(actor="bob")] == ["bob"]
    assert seqs(entity_type="transition", entity_id="t1") == [("alice", "approval.approve", "t1")]
    assert seqs(entity_id="t1", actor="alice") == [
        ("alice", "policy.set", "t1"),
        ("alice", "approval.approve", "t1"),
    ]
    after = seqs(since=middle.isoformat(), actor="alice")
    assert after == [("alice", "policy.set", "t1"), ("alice", "approval.reject", "t3")]
    before = seqs(until=middle.isoformat(), entity_type="transition")
    assert [e for _, _, e in before] == ["t2", "t1"]
    assert seqs(action="approval.approve", limit="1", offset="1") == []


@pytest.mark.parametrize(
    ("params", "code", "says"),
    [
        ({"since": "2026-01-01T00:00:00"}, "invalid_input", "`since` needs a timezone"),
        ({"until": "2026-01-01T10:00"}, "invalid_input", "`until` needs a timezone"),
        ({"since": "yesterday"}, "invalid_request", "ISO-8601"),
        ({"until": "0.5"}, "invalid_request", "ISO-8601"),  # not seconds since 1970
        ({"since": "1700000000"}, "invalid_request", "ISO-8601"),
        ({"since": "2026-13-01T00:00:00Z"}, "invalid_request", "datetime"),
        ({"since": "1900-01-01T00:00:00Z"}, "invalid_request", "must lie between"),
        (
            {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
            "invalid_input",
            "`since` is after `until`",
        ),
        ({"actr": "alice"}, "invalid_request", "unknown query parameter"),
    ],
)
def test_audit_filters_refuse_bad_instants_with_a_reason(
    client: TestClient, factory: Factory, params: dict[str, str], code: str, says: str
) -> None:
    r = client.get("/api/v1/audit", params=params, headers=factory.token("vic", "viewer"))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == code
    assert says in str(body["detail"])


# -- model cards ------------------------------------------------------------------------------

HOSTILE_NAME = "evil[x](javascript:alert(1))<img src=x onerror=alert(1)>"
HOSTILE_REASON = "ok\n\n[ref]: https://evil.example\n<script>alert(1)</script> <https://evil.example> ![i](https://evil.example/i.png) **bold**"  # noqa: E501


def _card_world(factory: Factory, engine: Engine, name: str) -> str:
    """A version that went candidate -> canary -> production with an approval, a report and a
    rejection on the way, with model- and person-written text in every field it can be."""
    factory.version(name, 1, creator="ds-carl", metrics={"auc|x": 0.91})
    factory.version(name, 2)
    with transaction(engine) as s:
        tid, _ = transitions.request(
            s, principal=Principal("erin", Role.author), model=name, version=1,
            to_stage=Stage.shadow, reason="first try", now=utcnow(),
        )  # fmt: skip
        transitions.decide(
            s, principal=Principal("bob", Role.approver), transition_id=tid.id,
            decision="reject", comment=HOSTILE_REASON, now=utcnow(),
        )  # fmt: skip
        evaluations.record(
            s, model=name, version=1, kind="shadow", passed=True, reason=HOSTILE_REASON,
            sample_size=800, summary={"agreement": 0.97}, window_start=REGISTERED, actor="test",
        )  # fmt: skip
    _move(engine, name, 1, Stage.canary, REGISTERED + timedelta(hours=1))
    _move(engine, name, 1, Stage.production, REGISTERED + timedelta(hours=2))
    _move(engine, name, 2, Stage.canary, REGISTERED + timedelta(hours=3))
    _move(engine, name, 2, Stage.production, REGISTERED + timedelta(hours=4))
    return tid.id


def test_card_json_holds_lineage_approvals_evidence_and_production_history(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    rejected = _card_world(factory, engine, "fraud")
    r = client.get("/api/v1/models/fraud/versions/1/card", headers=factory.token("vic", "viewer"))
    assert r.status_code == 200, r.text
    card = r.json()
    assert (card["model"], card["version"], card["stage"]) == ("fraud", 1, "retired")
    assert card["digest"] == f"{1:064x}"
    assert card["lineage"]["run_id"] == "run0001"
    assert card["lineage"]["creator"] == "ds-carl"
    assert card["lineage"]["datasets"][0]["source"] == "file:///data/fraud.csv"
    assert card["lineage"]["metrics"] == {"auc|x": 0.91}
    [approval] = card["approvals"]
    assert approval["transition_id"] == rejected
    assert approval["decision"] == "reject"
    assert (approval["from_stage"], approval["to_stage"]) == ("candidate", "shadow")
    assert approval["comment"] == HOSTILE_REASON  # JSON keeps text as written
    [evidence] = card["evidence"]
    assert evidence["kind"] == "shadow"
    assert evidence["summary"] == {"agreement": 0.97}
    [window] = card["production_history"]  # champion windows only
    assert window["role"] == "champion"
    assert window["started_at"] == "2026-01-01T02:00:00Z"
    assert window["ended_at"] == "2026-01-01T04:00:00Z"
    assert card["generated_at"]


def _render(md: str) -> list[str]:
    commonmark = MarkdownIt("commonmark").enable("table").render(md)
    return [commonmark, python_markdown.markdown(md, extensions=["tables"])]


def test_card_markdown_reads_as_a_document_and_escapes_what_models_and_people_wrote(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    factory.token("vic", "viewer")
    _card_world(factory, engine, HOSTILE_NAME)
    r = client.get(
        f"/api/v1/models/{HOSTILE_NAME}/versions/1/card",
        params={"format": "md"},
        headers=factory.token("viv", "viewer"),
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/markdown")
    md = r.text
    for heading in ("## Lineage", "## Approvals", "## Evidence", "## Production history"):
        assert f"\n{heading}\n" in md
    for html in _render(md):
        # Nothing anyone wrote became a link, image, tag, heading, emphasis or definition.
        for tag in ("<a ", "<img", "<script", "<strong>bold", "<em>", "<h1>ok", "<h2>ok"):
            assert tag not in html, (tag, html)
        assert html.count("<h1>") == 1
        assert html.count("<h2>") == 4
        assert "2026-01-01 02:00:00 UTC" in html  # the production window
    commonmark = _render(md)[0]
    assert "evil[x](javascript:alert(1))&lt;img src=x onerror=alert(1)&gt;" in commonmark
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in commonmark
    assert "[ref]: https://evil.example" in commonmark  # shown as text, in its table cell
    # The metric named `auc|x` stays in its cell: the table keeps two columns.
    assert "<td>auc|x</td>" in commonmark


@pytest.mark.parametrize("query", ["format=xml", "format=MD", "format=md&format=json", "fmt=md"])
def test_card_format_other_than_json_or_md_is_422(
    client: TestClient, factory: Factory, query: str
) -> None:
    factory.version("fraud", 1)
    r = client.get(
        f"/api/v1/models/fraud/versions/1/card?{query}", headers=factory.token("vic", "viewer")
    )
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request"


def test_card_of_an_unknown_version_is_404(client: TestClient, factory: Factory) -> None:
    factory.version("fraud", 1)
    head = factory.token("vic", "viewer")
    for fmt in ("json", "md"):
        r = client.get(f"/api/v1/models/fraud/versions/2/card?format={fmt}", headers=head)
        assert r.status_code == 404
        assert r.json()["code"] == "not_found"


# -- every new endpoint: authorized and declared -----------------------------------------------

NEW = {
    "/api/v1/me": {401, 422, 503},
    "/api/v1/fleet": {401, 422, 503},
    "/api/v1/models/{name}/versions/{version}/deployments": {401, 404, 422, 503},
    "/api/v1/models/{name}/versions/{version}/card": {401, 404, 422, 503},
}


def test_new_endpoints_need_a_token_and_declare_their_errors(client: TestClient) -> None:
    paths = client.get("/api/openapi.json").json()["paths"]
    for path, errors in NEW.items():
        sample = path.replace("{name}", "fraud").replace("{version}", "1")
        r = client.get(sample)
        assert r.status_code == 401, path
        assert r.json()["code"] == "unauthenticated", path
        answers = paths[path]["get"]["responses"]
        assert {int(s) for s in answers} == {200} | errors, path
        for status in errors:
            schema = answers[str(status)]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ErrorPublic"), (path, status)
    # The card declares both of its formats.
    card = paths["/api/v1/models/{name}/versions/{version}/card"]["get"]["responses"]["200"]
    assert set(card["content"]) == {"application/json", "text/markdown"}
    assert card["content"]["application/json"]["schema"]["$ref"].endswith("/CardPublic")


def test_production_at_a_number_is_refused_like_the_audit_instants(
    client: TestClient, factory: Factory
) -> None:
    """Pydantic would read `at=0.5` as half a second after 1970; an instant is ISO-8601."""
    factory.version("fraud", 1)
    head = factory.token("vic", "viewer")
    r = client.get("/api/v1/models/fraud/production", params={"at": "0.5"}, headers=head)
    assert r.status_code == 422, r.text
    assert "ISO-8601" in str(r.json()["detail"])
    ok = client.get(
        "/api/v1/models/fraud/production", params={"at": "2026-01-02T00:00:00Z"}, headers=head
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["version"] is None
