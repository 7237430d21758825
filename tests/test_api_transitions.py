"""Transitions through the API: gates, approvals, separation of duties, conflicts, apply."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from stagegate.db import transaction
from stagegate.events.sink import MemorySink
from stagegate.governance import evaluations, versions
from stagegate.lifecycle.stages import Stage
from stagegate.steps.apply import apply_transition
from tests.factories import Factory
from tests.fakes import FakeRegistry

Json = dict[str, Any]


@pytest.fixture
def people(factory: Factory) -> dict[str, dict[str, str]]:
    return {
        "erin": factory.token("erin", "author"),
        "dana": factory.token("dana", "author"),  # the version's creator
        "alice": factory.token("alice", "approver"),
        "bob": factory.token("bob", "approver"),
        "root": factory.token("root", "admin"),
        "vic": factory.token("vic", "viewer"),
    }


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    for v in (1, 2):
        reg.add("fraud", v)
    return reg


def request(
    client: TestClient, who: dict[str, str], to: str, version: int = 1, model: str = "fraud"
) -> Json:
    r = client.post(
        "/api/v1/transitions",
        headers=who,
        json={"model": model, "version": version, "to_stage": to, "reason": "why"},
    )
    assert r.status_code == 201, r.text
    body: Json = r.json()
    return body


def decide(
    client: TestClient, who: dict[str, str], tid: str, decision: str = "approve", expect: int = 201
) -> Json:
    r = client.post(
        f"/api/v1/transitions/{tid}/approvals",
        headers=who,
        json={"decision": decision, "comment": "looks fine"},
    )
    assert r.status_code == expect, r.text
    body: Json = r.json()
    return body


def stage(client: TestClient, who: dict[str, str], version: int = 1) -> str:
    r = client.get(f"/api/v1/models/fraud/versions/{version}", headers=who)
    assert r.status_code == 200, r.text
    value: str = r.json()["stage"]
    return value


def report(
    engine: Engine, version: int, kind: str, *, passed: bool = True, model: str = "fraud"
) -> None:
    """What the shadow/canary flow records once it has seen enough traffic: bound to the
    champion of the moment, as the flow does."""
    with transaction(engine) as s:
        champion = versions.holder(s, model, Stage.production)
        evaluations.record(
            s,
            champion_version=champion.version if champion else None,
            model=model,
            version=version,
            kind=kind,
            passed=passed,
            reason="test report",
            sample_size=500,
            summary={},
            window_start=datetime.now(UTC),
            actor="test",
        )


REPORT_BEFORE = {"canary": "shadow", "production": "canary"}


def promote(
    client: TestClient,
    engine: Engine,
    registry: FakeRegistry,
    p: dict[str, dict[str, str]],
    version: int,
    to: str,
    approvers: tuple[str, ...] = ("alice",),
) -> Json:
    if to in REPORT_BEFORE:
        report(engine, version, REPORT_BEFORE[to])
    t = request(client, p["erin"], to, version)
    for who in approvers:
        t = decide(client, p[who], t["id"])
    assert t["status"] == "approved", t
    result = apply_transition(engine, registry, t["id"])
    assert result.status == "applied", result
    return t


def test_walk_to_production_and_retire_the_old_champion(
    client: TestClient,
    factory: Factory,
    engine: Engine,
    registry: FakeRegistry,
    sink: MemorySink,
    people: dict[str, dict[str, str]],
) -> None:
    factory.version("fraud", 1)
    factory.version("fraud", 2)
    t = request(client, people["erin"], "shadow")
    assert t["status"] == "pending"
    assert t["from_stage"] == "candidate"
    assert {g["gate"]: g["passed"] for g in t["gates"]} == {"approvals": False, "stage_free": True}
    t = decide(client, people["alice"], t["id"])
    assert t["status"] == "approved"
    assert [e.event for e in sink.events] == ["stagegate.transition.approved"]
    assert sink.events[0].resource["stagegate.transition.id"] == t["id"]
    assert stage(client, people["vic"]) == "candidate"  # approval alone moves nothing
    apply_transition(engine, registry, t["id"])
    assert stage(client, people["vic"]) == "shadow"
    assert registry.aliases["fraud"] == {"shadow": 1}

    promote(client, engine, registry, people, 1, "canary")
    t = request(client, people["erin"], "production")
    assert {g["gate"]: g["passed"] for g in t["gates"]}["canary_report"] is False
    report(engine, 1, "canary")
    t = decide(client, people["alice"], t["id"])
    assert t["status"] == "pending", "canary->production needs two approvers"
    t = decide(client, people["bob"], t["id"])
    assert t["status"] == "approved"
    apply_transition(engine, registry, t["id"])
    assert registry.aliases["fraud"] == {"champion": 1}

    for to in ("shadow", "canary"):
        promote(client, engine, registry, people, 2, to)
    promote(client, engine, registry, people, 2, "production", ("alice", "bob"))
    assert stage(client, people["vic"], 1) == "retired"
    assert stage(client, people["vic"], 2) == "production"
    assert registry.aliases["fraud"] == {"champion": 2}
    assert registry.stage_tags[("fraud", 1)] == "retired"
    listing = client.get("/api/v1/models", headers=people["vic"]).json()
    assert listing["data"][0]["champion"] == 2
    assert client.get("/api/v1/audit/verify", headers=people["vic"]).json()["ok"] is True


def test_apply_is_idempotent(
    client: TestClient,
    factory: Factory,
    engine: Engine,
    registry: FakeRegistry,
    people: dict[str, dict[str, str]],
) -> None:
    factory.version("fraud", 1)
    t = promote(client, engine, registry, people, 1, "shadow")
    audit_rows = len(client.get("/api/v1/audit?limit=200", headers=people["vic"]).json()["data"])
    again = apply_transition(engine, registry, t["id"])
    assert again.status == "applied"
    assert stage(client, people["vic"]) == "shadow"
    after = len(client.get("/api/v1/audit?limit=200", headers=people["vic"]).json()["data"])
    assert after == audit_rows


def test_separation_of_duties(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator="dana")
    t = request(client, people["erin"], "shadow")
    r = decide(client, people["erin"], t["id"], expect=403)
    assert "requester" in r["detail"]
    # dana wrote the version; her author token may not decide either
    r = client.post(
        f"/api/v1/transitions/{t['id']}/approvals",
        headers=people["dana"],
        json={"decision": "approve"},
    )
    assert r.status_code == 403


def test_author_creator_cannot_approve_even_with_an_approver_token(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator="carol")
    carol = factory.token("carol", "approver")
    t = request(client, people["erin"], "shadow")
    r = decide(client, carol, t["id"], expect=403)
    assert "author" in r["detail"]


def test_double_decision_and_decisions_on_closed_transitions_conflict(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1)
    t = request(client, people["erin"], "shadow")
    decide(client, people["alice"], t["id"])
    assert decide(client, people["bob"], t["id"], expect=409)["code"] == "conflict"


def test_reject_closes_the_transition(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1)
    t = request(client, people["erin"], "shadow")
    t = decide(client, people["alice"], t["id"], "reject")
    assert t["status"] == "rejected"
    assert stage(client, people["vic"]) == "candidate"
    # a new request may follow once the old one is closed
    request(client, people["erin"], "shadow")


def test_stage_moved_meanwhile_is_409(
    client: TestClient,
    factory: Factory,
    engine: Engine,
    registry: FakeRegistry,
    people: dict[str, dict[str, str]],
) -> None:
    factory.version("fraud", 1)
    rejected = request(client, people["erin"], "rejected")
    # a second open transition for the same version is refused
    r = client.post(
        "/api/v1/transitions",
        headers=people["erin"],
        json={"model": "fraud", "version": 1, "to_stage": "shadow", "reason": "x"},
    )
    assert r.status_code == 409
    decide(client, people["alice"], rejected["id"])
    apply_transition(engine, registry, rejected["id"])
    assert stage(client, people["vic"]) == "rejected"
    r = client.post(
        "/api/v1/transitions",
        headers=people["erin"],
        json={"model": "fraud", "version": 1, "to_stage": "shadow", "reason": "x"},
    )
    assert r.status_code == 409
    assert "cannot move" in r.json()["detail"]


def test_approval_after_the_version_moved_is_409(
    client: TestClient,
    factory: Factory,
    engine: Engine,
    registry: FakeRegistry,
    people: dict[str, dict[str, str]],
) -> None:
    from stagegate.db import transaction
    from stagegate.governance import versions

    factory.version("fraud", 1)
    t = request(client, people["erin"], "shadow")
    with transaction(engine) as s:  # someone moved it by another path
        row = versions.get_version(s, "fraud", 1)
        from stagegate.lifecycle.stages import Stage

        row.stage = Stage.rejected
        s.add(row)
    r = decide(client, people["alice"], t["id"], expect=409)
    assert "moved to rejected" in r["detail"]


def test_swapped_artifact_voids_the_approval(
    client: TestClient,
    factory: Factory,
    engine: Engine,
    registry: FakeRegistry,
    people: dict[str, dict[str, str]],
) -> None:
    factory.version("fraud", 1)
    t = request(client, people["erin"], "shadow")
    t = decide(client, people["alice"], t["id"])
    registry.swap_artifact("fraud", 1)
    result = apply_transition(engine, registry, t["id"])
    assert result.status == "failed"
    assert "artifact changed" in (result.reason or "")
    assert stage(client, people["vic"]) == "candidate"
    v = client.get("/api/v1/models/fraud/versions/1", headers=people["vic"]).json()
    assert v["digest"] == "f" * 64


def test_rollback_restores_the_previous_champion(
    client: TestClient,
    factory: Factory,
    engine: Engine,
    registry: FakeRegistry,
    people: dict[str, dict[str, str]],
) -> None:
    for v in (1, 2):
        factory.version("fraud", v)
        for to in ("shadow", "canary"):
            promote(client, engine, registry, people, v, to)
        promote(client, engine, registry, people, v, "production", ("alice", "bob"))
    rollback = promote(client, engine, registry, people, 2, "rolled_back", ("bob",))
    assert stage(client, people["vic"], 2) == "rolled_back"
    assert stage(client, people["vic"], 1) == "production"
    assert registry.aliases["fraud"] == {"champion": 1}
    now = client.get("/api/v1/models/fraud/production", headers=people["vic"]).json()
    assert now["version"] == 1
    assert now["window_opened_by"] == rollback["id"]
    # who approved v1 into production, not who approved the rollback
    assert now["transition"]["to_stage"] == "production"
    assert sorted(a["approver"] for a in now["approved_by"]) == ["alice", "bob"]


def test_production_at_time_and_approvers(
    client: TestClient,
    factory: Factory,
    engine: Engine,
    registry: FakeRegistry,
    people: dict[str, dict[str, str]],
) -> None:
    before = datetime.now(UTC)
    factory.version("fraud", 1)
    for to in ("shadow", "canary"):
        promote(client, engine, registry, people, 1, to)
    promote(client, engine, registry, people, 1, "production", ("alice", "bob"))
    middle = datetime.now(UTC)
    factory.version("fraud", 2)
    for to in ("shadow", "canary"):
        promote(client, engine, registry, people, 2, to)
    promote(client, engine, registry, people, 2, "production", ("bob", "alice"))

    def at(when: datetime) -> Json:
        r = client.get(
            "/api/v1/models/fraud/production",
            params={"at": when.isoformat()},
            headers=people["vic"],
        )
        assert r.status_code == 200, r.text
        body: Json = r.json()
        return body

    assert at(before)["version"] is None
    mid = at(middle)
    assert mid["version"] == 1
    assert sorted(a["approver"] for a in mid["approved_by"]) == ["alice", "bob"]
    assert mid["until"] is not None
    assert mid["datasets"][0]["digest"] == "d0"
    now = at(datetime.now(UTC) + timedelta(seconds=1))
    assert now["version"] == 2
    assert now["until"] is None
    assert now["transition"]["to_stage"] == "production"
    naive = client.get(
        "/api/v1/models/fraud/production",
        params={"at": "2026-01-01T00:00:00"},
        headers=people["vic"],
    )
    assert naive.status_code == 422


def test_consumers_of_an_upstream_version(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("embedder", 3)
    factory.version("ranker-a", 1, depends_on=(("embedder", 3),))
    factory.version("ranker-b", 1, depends_on=(("embedder", 3),))
    r = client.get("/api/v1/models/embedder/versions/3/consumers", headers=people["vic"])
    assert [(c["model"], c["version"]) for c in r.json()] == [("ranker-a", 1), ("ranker-b", 1)]
    prod = client.get(
        "/api/v1/models/embedder/versions/3/consumers?production_only=true", headers=people["vic"]
    )
    assert prod.json() == []
    lineage = client.get("/api/v1/models/ranker-a/versions/1/lineage", headers=people["vic"])
    assert lineage.json()["version"]["depends_on"] == [
        {"model": "embedder", "version": 3, "stage": "candidate"}
    ]


def test_policy_is_data_per_model(
    client: TestClient,
    factory: Factory,
    engine: Engine,
    registry: FakeRegistry,
    people: dict[str, dict[str, str]],
) -> None:
    factory.version("fraud", 1)
    policy = client.get("/api/v1/models/fraud/policy", headers=people["vic"]).json()
    for rule in policy["approvals"]:
        rule["required"] = 0
    r = client.put("/api/v1/models/fraud/policy", headers=people["root"], json=policy)
    # No approvals at all is below the floor: a second admin must agree (four eyes).
    assert r.status_code == 202, r.text
    r = client.post(
        f"/api/v1/policy-changes/{r.json()['id']}/approvals",
        headers=factory.token("root2", "admin"),
        json={"decision": "approve"},
    )
    assert r.status_code == 201, r.text
    t = request(client, people["erin"], "shadow")
    assert t["status"] == "approved"
    bad = dict(policy, approvals=policy["approvals"][:1])
    r = client.put("/api/v1/models/fraud/policy", headers=people["root"], json=bad)
    assert r.status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"model": "fraud", "version": 1, "to_stage": "shadow", "reason": "x", "status": "applied"},
        {"model": "fraud", "version": 1, "to_stage": "shadow", "reason": "x", "id": "mine"},
        {
            "model": "fraud",
            "version": 1,
            "to_stage": "shadow",
            "reason": "x",
            "created_at": "2020-01-01T00:00:00Z",
        },
        {"model": "fraud", "version": 1, "to_stage": "heaven", "reason": "x"},
        {"model": "fraud", "version": 0, "to_stage": "shadow", "reason": "x"},
        {"model": "fraud", "version": 1, "to_stage": "shadow", "reason": ""},
        {"model": "fraud", "version": 1, "to_stage": "shadow"},
        ["not", "an", "object"],
    ],
)
def test_bad_transition_bodies_are_422(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]], body: Any
) -> None:
    factory.version("fraud", 1)
    r = client.post("/api/v1/transitions", headers=people["erin"], json=body)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request"


@pytest.mark.parametrize(
    "body",
    [
        {"decision": "approve", "approved_by": "alice"},
        {"decision": "approve", "status": "approved"},
        {"decision": "maybe"},
    ],
)
def test_bad_approval_bodies_are_422(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]], body: Json
) -> None:
    factory.version("fraud", 1)
    t = request(client, people["erin"], "shadow")
    r = client.post(f"/api/v1/transitions/{t['id']}/approvals", headers=people["alice"], json=body)
    assert r.status_code == 422, r.text


def test_malformed_json_is_422(client: TestClient, people: dict[str, dict[str, str]]) -> None:
    r = client.post(
        "/api/v1/transitions",
        content=b"{not json",
        headers={**people["erin"], "Content-Type": "application/json"},
    )
    assert r.status_code == 422
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/models?limit=201",
        "/api/v1/transitions?limit=1000",
        "/api/v1/audit?limit=100000",
        "/api/v1/models?offset=-1",
    ],
)
def test_page_size_over_the_cap_is_422(
    client: TestClient, people: dict[str, dict[str, str]], path: str
) -> None:
    assert client.get(path, headers=people["vic"]).status_code == 422


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/v1/models/nope/versions/1", None),
        ("GET", "/api/v1/models/fraud/versions/99", None),
        ("GET", "/api/v1/models/nope/production", None),
        ("GET", "/api/v1/transitions/doesnotexist", None),
        ("POST", "/api/v1/transitions/doesnotexist/approvals", {"decision": "approve"}),
        (
            "POST",
            "/api/v1/transitions",
            {"model": "nope", "version": 1, "to_stage": "shadow", "reason": "x"},
        ),
        ("GET", "/api/v1/models/nope/policy", None),
    ],
)
def test_unknown_names_are_404(
    client: TestClient,
    factory: Factory,
    people: dict[str, dict[str, str]],
    method: str,
    path: str,
    body: Json | None,
) -> None:
    factory.version("fraud", 1)
    r = client.request(method, path, json=body, headers=people["root"])
    assert r.status_code == 404, r.text
    assert r.json()["code"] == "not_found"


def test_list_filters(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1)
    factory.version("churn", 1)
    request(client, people["erin"], "shadow", model="fraud")
    request(client, people["erin"], "shadow", model="churn")
    r = client.get("/api/v1/transitions?model=churn&status=pending", headers=people["vic"])
    assert [t["model"] for t in r.json()["data"]] == ["churn"]
    r = client.get("/api/v1/transitions?status=applied", headers=people["vic"])
    assert r.json()["data"] == []
    assert client.get("/api/v1/transitions?status=bogus", headers=people["vic"]).status_code == 422
