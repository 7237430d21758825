"""Policy changes: those that weaken wait for a second admin (four eyes), the rest apply at
once; every one is a `PolicyChange` row and in the audit log, committed with the change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import select

from stagegate.api.app import create_app
from stagegate.db import transaction
from stagegate.events.sink import MemorySink
from stagegate.governance import audit, policies
from stagegate.governance.models import AuditEntry, PolicyChange, PolicyChangeStatus
from stagegate.lifecycle.policy import Policy, default_policy
from stagegate.lifecycle.stages import Role, Stage
from stagegate.settings import GovernanceSettings, Settings
from tests.factories import Factory

Json = dict[str, Any]
URL = "/api/v1/models/fraud/policy"


@pytest.fixture
def people(factory: Factory) -> dict[str, dict[str, str]]:
    factory.version("fraud", 1)
    return {
        "root": factory.token("root", "admin"),
        "ops": factory.token("ops", "admin"),
        "alice": factory.token("alice", "approver"),
        "vic": factory.token("vic", "viewer"),
    }


def current(client: TestClient, who: dict[str, str]) -> Json:
    body: Json = client.get(URL, headers=who).json()
    return body


def same(a: Json, b: Json) -> bool:
    """Equal as policies (sets of stages and roles come back in any order in JSON)."""
    return Policy.model_validate(a) == Policy.model_validate(b)


def with_required(policy: Json, move_to: str, required: int) -> Json:
    for rule in policy["approvals"]:
        if move_to in rule["to_stages"]:
            rule["required"] = required
    return policy


def decide(client: TestClient, who: dict[str, str], change_id: str, decision: str) -> Any:
    return client.post(
        f"/api/v1/policy-changes/{change_id}/approvals",
        headers=who,
        json={"decision": decision, "comment": "reviewed"},
    )


def audit_actions(engine: Engine) -> list[tuple[str, str, str]]:
    with transaction(engine, read_only=True) as s:
        rows = s.exec(select(AuditEntry).order_by(AuditEntry.seq)).all()
        return [(r.actor, r.action, r.entity_id) for r in rows if r.entity_type == "policy"]


# -- what weakens a policy -----------------------------------------------------------------


def _changed(**update: Any) -> Policy:
    return default_policy().model_copy(update=update)


def _rules(to: Stage, **update: Any) -> Policy:
    base = default_policy()
    rules = [r.model_copy(update=update) if to in r.to_stages else r for r in base.approvals]
    return base.model_copy(update={"approvals": rules})


@pytest.mark.parametrize(
    ("new", "floor", "says"),
    [
        (_rules(Stage.production, required=0), 1, ["canary->production: approvals lowered"]),
        (_rules(Stage.production, required=1), 2, ["from 2 to 1, below the floor of 2"]),
        (_rules(Stage.production, roles=frozenset({Role.admin})), 1, ["added admin; removed"]),
        (_rules(Stage.shadow, roles=frozenset({Role.admin})), 1, ["removed approver"]),
        (_changed(unmapped_author="warn"), 1, ["linked to no identity now count"]),
    ],
)
def test_weakenings_are_named(new: Policy, floor: int, says: list[str]) -> None:
    found = policies.weakenings(default_policy(), new, floor=floor)
    assert len(found) >= len(says)
    for phrase in says:
        assert any(phrase in f for f in found), found


def test_a_drift_rollback_without_approval_weakens() -> None:
    drift = default_policy().drift
    alone = drift.model_copy(
        update={"actions": drift.actions.model_copy(update={"rollback_applies_alone": True})}
    )
    found = policies.weakenings(default_policy(), _changed(drift=alone), floor=1)
    assert found == ["drift rollbacks now apply without approval"]


@pytest.mark.parametrize(
    ("new", "floor"),
    [
        (default_policy(), 1),  # the same
        (_rules(Stage.production, required=3), 1),  # stricter
        (_rules(Stage.production, required=1), 1),  # lower, but not below the floor
        (_rules(Stage.production, required=0), 0),  # the floor allows none
        (_changed(unmapped_author="block"), 1),
        (_changed(primary_metric="accuracy", approval_ttl_days=3), 1),
    ],
)
def test_changes_that_do_not_weaken(new: Policy, floor: int) -> None:
    assert policies.weakenings(default_policy(), new, floor=floor) == []


# -- through the API ------------------------------------------------------------------------


def test_a_change_that_does_not_weaken_applies_at_once(
    client: TestClient, engine: Engine, people: dict[str, dict[str, str]]
) -> None:
    policy = current(client, people["vic"])
    policy["primary_metric"] = "accuracy"
    r = client.put(URL, headers=people["root"], json=with_required(policy, "production", 3))
    assert r.status_code == 200, r.text
    assert same(current(client, people["vic"]), policy)
    changes = client.get("/api/v1/policy-changes", headers=people["vic"]).json()["data"]
    assert [(c["status"], c["proposed_by"], c["weakens"]) for c in changes] == [
        ("applied", "root", [])
    ]
    assert audit_actions(engine) == [("root", "policy.set", "fraud")]


def test_a_weakening_change_waits_for_a_second_admin(
    client: TestClient, engine: Engine, people: dict[str, dict[str, str]]
) -> None:
    before = current(client, people["vic"])
    proposed = with_required(current(client, people["vic"]), "production", 0)
    r = client.put(URL, headers=people["root"], json=proposed)
    assert r.status_code == 202, r.text
    change = r.json()
    assert change["status"] == "pending"
    assert same(change["policy"], proposed)
    assert change["weakens"] == [
        "canary->production: approvals lowered from 2 to 0, below the floor of 1"
    ]
    assert same(current(client, people["vic"]), before)  # not in force yet

    # The proposer may not approve it: four eyes.
    r = decide(client, people["root"], change["id"], "approve")
    assert r.status_code == 403
    assert r.json()["detail"] == (
        "the admin who proposed a policy change may not approve it; another admin must"
    )
    assert same(current(client, people["vic"]), before)

    r = decide(client, people["ops"], change["id"], "approve")
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["decided_by"]) == ("applied", "ops")
    assert same(current(client, people["vic"]), proposed)
    assert audit_actions(engine) == [
        ("root", "policy.proposed", "fraud"),
        ("ops", "policy.change_approved", "fraud"),
        ("ops", "policy.set", "fraud"),
    ]
    # Decided once: a second decision is a conflict.
    assert decide(client, people["ops"], change["id"], "approve").status_code == 409
    with transaction(engine, read_only=True) as s:
        assert audit.verify(s).ok


def test_a_rejected_change_never_applies(
    client: TestClient, engine: Engine, people: dict[str, dict[str, str]]
) -> None:
    before = current(client, people["vic"])
    weak = with_required(current(client, people["vic"]), "shadow", 0)
    first = client.put(URL, headers=people["root"], json=weak).json()
    r = decide(client, people["ops"], first["id"], "reject")
    assert r.status_code == 201
    assert (r.json()["status"], r.json()["comment"]) == ("rejected", "reviewed")
    assert same(current(client, people["vic"]), before)
    # The proposer may withdraw their own change (reject it), just not approve it.
    second = client.put(URL, headers=people["root"], json=weak).json()
    assert decide(client, people["root"], second["id"], "reject").status_code == 201
    assert same(current(client, people["vic"]), before)
    assert [a for _, a, _ in audit_actions(engine)] == [
        "policy.proposed",
        "policy.change_rejected",
        "policy.proposed",
        "policy.change_rejected",
    ]


def test_one_pending_change_per_model_and_a_stale_one_is_refused(
    client: TestClient, people: dict[str, dict[str, str]]
) -> None:
    weak = with_required(current(client, people["vic"]), "production", 0)
    pending = client.put(URL, headers=people["root"], json=weak).json()
    r = client.put(URL, headers=people["ops"], json=weak)
    assert r.status_code == 409
    assert f"policy change {pending['id']} for 'fraud' is pending" in r.json()["detail"]
    # A change that does not weaken still applies; the pending one was proposed against
    # the old policy, so approving it would undo this one without anyone seeing it.
    stricter = current(client, people["vic"])
    stricter["approval_ttl_days"] = 3
    assert client.put(URL, headers=people["ops"], json=stricter).status_code == 200
    r = decide(client, people["ops"], pending["id"], "approve")
    assert r.status_code == 409
    assert "changed since change" in r.json()["detail"]
    assert same(current(client, people["vic"]), stricter)


def test_the_default_policy_is_guarded_too(
    client: TestClient, people: dict[str, dict[str, str]]
) -> None:
    default = client.get("/api/v1/models/*/policy", headers=people["vic"]).json()
    r = client.put(
        "/api/v1/models/*/policy",
        headers=people["root"],
        json=with_required(default, "retired", 0),
    )
    assert r.status_code == 202, r.text
    assert r.json()["model"] == "*"
    assert decide(client, people["ops"], r.json()["id"], "approve").status_code == 201
    assert same(client.get(URL, headers=people["vic"]).json(), with_required(default, "retired", 0))


@pytest.mark.parametrize("who", ["alice", "vic"])
def test_only_admins_decide_changes_and_anyone_reads_them(
    client: TestClient, people: dict[str, dict[str, str]], who: str
) -> None:
    weak = with_required(current(client, people["vic"]), "production", 0)
    change = client.put(URL, headers=people["root"], json=weak).json()
    assert decide(client, people[who], change["id"], "approve").status_code == 403
    r = client.get(f"/api/v1/policy-changes/{change['id']}", headers=people[who])
    assert r.status_code == 200
    assert r.json()["status"] == "pending"
    listed = client.get("/api/v1/policy-changes", headers=people[who], params={"status": "pending"})
    assert [c["id"] for c in listed.json()["data"]] == [change["id"]]
    assert client.get("/api/v1/policy-changes/nope", headers=people[who]).status_code == 404


@pytest.fixture
def strict_client(tmp_path: Path, engine: Engine) -> Iterator[TestClient]:
    """The API with the approvals floor raised to 2."""
    settings = Settings(home=tmp_path / "home", governance=GovernanceSettings(min_approvals=2))
    with TestClient(create_app(settings, engine=engine, sink=MemorySink())) as c:
        yield c


def test_the_floor_comes_from_the_settings(
    client: TestClient, strict_client: TestClient, people: dict[str, dict[str, str]]
) -> None:
    one = with_required(current(client, people["vic"]), "production", 1)
    r = strict_client.put(URL, headers=people["root"], json=one)
    assert r.status_code == 202
    assert r.json()["weakens"] == [
        "canary->production: approvals lowered from 2 to 1, below the floor of 2"
    ]
    decide(client, people["ops"], r.json()["id"], "reject")
    # With the default floor of 1, the same change is not below it and applies at once.
    assert client.put(URL, headers=people["root"], json=one).status_code == 200


# -- atomic: the approval, its audit rows and the policy commit together ---------------------


def test_an_approval_that_fails_to_commit_leaves_no_trace(
    engine: Engine, people: dict[str, dict[str, str]]
) -> None:
    weak = _rules(Stage.production, required=0)
    with transaction(engine) as s:
        change_id = policies.change_policy(s, "fraud", weak, actor="root", floor=1).id
    with transaction(engine, read_only=True) as s:
        head = audit.verify(s).rows

    class Crash(Exception):
        pass

    def approve_then_crash() -> None:
        with transaction(engine) as s:
            policies.decide_change(
                s, change_id=change_id, actor="ops", decision="approve", comment=None
            )
            raise Crash  # e.g. the process dies before the commit

    with pytest.raises(Crash):
        approve_then_crash()

    with transaction(engine, read_only=True) as s:
        change = s.get(PolicyChange, change_id)
        assert change is not None
        assert (change.status, change.decided_by) == (PolicyChangeStatus.pending, None)
        assert policies.get_policy(s, "fraud") == default_policy()
        assert audit.verify(s).rows == head
    # And the change can still be approved.
    with transaction(engine) as s:
        policies.decide_change(
            s, change_id=change_id, actor="ops", decision="approve", comment=None
        )
    with transaction(engine, read_only=True) as s:
        assert policies.get_policy(s, "fraud") == weak
