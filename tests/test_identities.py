"""Identities and their MLflow user names: the links, separation of duties through them,
unmapped authors by policy, the one-decision rule across expiry, and the demo's link."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from click.testing import Result
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from typer.testing import CliRunner

from stagegate import demo
from stagegate.cli import app
from stagegate.db import make_engine, transaction
from stagegate.errors import ConflictError
from stagegate.governance import audit, identities, policies, tokens, transitions, versions
from stagegate.governance.models import Approval, AuditEntry, IdentityLink
from stagegate.governance.tokens import Principal
from stagegate.lifecycle import gates
from stagegate.lifecycle.gates import AuthorFacts
from stagegate.lifecycle.policy import default_policy
from stagegate.lifecycle.stages import Role, Stage
from stagegate.migrate import alembic_config, upgrade
from stagegate.settings import Settings, get_settings
from tests.factories import Factory

Json = dict[str, Any]
LOGIN = "ds-laptop-7"  # an MLflow user name that is nobody's token name


@pytest.fixture
def people(factory: Factory) -> dict[str, dict[str, str]]:
    return {
        "erin": factory.token("erin", "author"),
        "alice": factory.token("alice", "approver"),
        "bob": factory.token("bob", "approver"),
        "root": factory.token("root", "admin"),
        "vic": factory.token("vic", "viewer"),
    }


def link_url(name: str, user: str) -> str:
    return f"/api/v1/identities/{name}/mlflow-users/{user}"


def actions(engine: Engine, action: str) -> list[AuditEntry]:
    with transaction(engine, read_only=True) as s:
        return list(s.exec(select(AuditEntry).where(AuditEntry.action == action)).all())


def open_shadow(client: TestClient, who: dict[str, str]) -> str:
    r = client.post(
        "/api/v1/transitions",
        headers=who,
        json={"model": "fraud", "version": 1, "to_stage": "shadow", "reason": "ready"},
    )
    assert r.status_code == 201, r.text
    tid: str = r.json()["id"]
    return tid


def approve(client: TestClient, who: dict[str, str], tid: str, decision: str = "approve") -> Any:
    return client.post(
        f"/api/v1/transitions/{tid}/approvals", headers=who, json={"decision": decision}
    )


def set_unmapped(engine: Engine, handling: str) -> None:
    with transaction(engine) as s:
        policy = default_policy().model_copy(update={"unmapped_author": handling})
        policies.set_policy(s, "fraud", policy, actor="test")


# -- the links ------------------------------------------------------------------------------


def test_an_admin_links_and_unlinks_with_audit_rows(
    client: TestClient, engine: Engine, people: dict[str, dict[str, str]]
) -> None:
    r = client.put(link_url("alice", LOGIN), headers=people["root"])
    assert r.status_code == 200, r.text
    assert r.json() == {
        "name": "alice",
        "role": "approver",
        "active": True,
        "mlflow_users": [LOGIN],
    }
    # Linking again changes nothing and writes nothing.
    assert client.put(link_url("alice", LOGIN), headers=people["root"]).status_code == 200
    [linked] = actions(engine, "identity.linked")
    assert (linked.actor, linked.entity_id, linked.data) == (
        "root",
        "alice",
        {"mlflow_user": LOGIN},
    )

    listed = client.get("/api/v1/identities", headers=people["root"]).json()["data"]
    assert {i["name"]: i["mlflow_users"] for i in listed} == {
        "alice": [LOGIN],
        "bob": [],
        "erin": [],
        "root": [],
        "vic": [],
    }

    r = client.delete(link_url("alice", LOGIN), headers=people["root"])
    assert r.status_code == 200, r.text
    assert r.json()["mlflow_users"] == []
    [unlinked] = actions(engine, "identity.unlinked")
    assert (unlinked.actor, unlinked.data) == ("root", {"mlflow_user": LOGIN})
    assert client.delete(link_url("alice", LOGIN), headers=people["root"]).status_code == 404
    with transaction(engine, read_only=True) as s:
        assert audit.verify(s).ok


def test_one_identity_per_mlflow_user(
    client: TestClient, people: dict[str, dict[str, str]]
) -> None:
    assert client.put(link_url("alice", LOGIN), headers=people["root"]).status_code == 200
    r = client.put(link_url("bob", LOGIN), headers=people["root"])
    assert r.status_code == 409
    assert "linked to 'alice'; unlink it first" in r.json()["detail"]
    # Unlinking from the wrong identity is refused too: the link stays alice's.
    assert client.delete(link_url("bob", LOGIN), headers=people["root"]).status_code == 404
    # One identity may carry several MLflow names (a laptop, a CI account).
    assert client.put(link_url("alice", "alice@corp"), headers=people["root"]).status_code == 200
    r = client.get("/api/v1/identities", headers=people["root"])
    alice = next(i for i in r.json()["data"] if i["name"] == "alice")
    assert alice["mlflow_users"] == ["alice@corp", LOGIN]


@pytest.mark.parametrize(
    ("name", "user", "status", "says"),
    [
        ("nobody", LOGIN, 404, "create a token for it first"),
        ("stagegate", LOGIN, 422, "platform's own identity"),
        ("alice", "two words", 422, "must be 1-200 letters"),
        ("alice", "-dash-first", 422, "must be 1-200 letters"),
    ],
)
def test_bad_links_are_refused_with_the_reason(
    client: TestClient,
    people: dict[str, dict[str, str]],
    name: str,
    user: str,
    status: int,
    says: str,
) -> None:
    r = client.put(link_url(name, user), headers=people["root"])
    assert r.status_code == status, r.text
    assert says in r.json()["detail"]


@pytest.mark.parametrize("who", ["alice", "erin", "vic"])
def test_only_admins_see_and_change_links(
    client: TestClient, people: dict[str, dict[str, str]], who: str
) -> None:
    for method, path in (
        ("GET", "/api/v1/identities"),
        ("PUT", link_url("alice", LOGIN)),
        ("DELETE", link_url("alice", LOGIN)),
    ):
        r = client.request(method, path, headers=people[who])
        assert r.status_code == 403, (method, path, r.text)


def test_a_revoked_identity_still_links_and_lists_inactive(
    engine: Engine, people: dict[str, dict[str, str]]
) -> None:
    with transaction(engine) as s:
        tokens.revoke_token(s, name="bob")
        assert identities.link(s, identity="bob", mlflow_user="bob-old", actor="test")
    with transaction(engine, read_only=True) as s:
        bob = identities.get_identity(s, "bob")
    assert (bob.active, bob.role, bob.mlflow_users) == (False, Role.approver, ["bob-old"])


# -- separation of duties through the links -------------------------------------------------


def test_a_linked_author_may_not_approve_under_another_name(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    """alice registers as MLflow user ds-laptop-7, not as 'alice': the name check alone
    passed her; the link refuses her."""
    factory.version("fraud", 1, creator=LOGIN)
    client.put(link_url("alice", LOGIN), headers=people["root"])
    tid = open_shadow(client, people["erin"])
    r = approve(client, people["alice"], tid)
    assert r.status_code == 403
    assert r.json()["detail"] == (
        f"alice is the author of fraud v1 (MLflow user '{LOGIN}' is linked to alice); "
        "the author of a version may not approve its transitions"
    )
    # Nor may she reject it: the author decides nothing on her own version.
    assert approve(client, people["alice"], tid, "reject").status_code == 403
    r = approve(client, people["bob"], tid)
    assert r.status_code == 201
    assert r.json()["status"] == "approved"


def test_approvals_given_before_the_link_stop_counting(
    engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    """The gate maps the author again at each evaluation: the second line of defence."""
    factory.version("fraud", 1, creator=LOGIN)
    now = datetime.now(UTC)
    with transaction(engine) as s:
        policy = default_policy().model_copy(update={"unmapped_author": "warn"})
        raised = [
            r.model_copy(update={"required": 2}) if Stage.shadow in r.to_stages else r
            for r in policy.approvals
        ]
        policies.set_policy(s, "fraud", policy.model_copy(update={"approvals": raised}), actor="t")
        t, _ = transitions.request(
            s,
            principal=Principal("erin", Role.author),
            model="fraud",
            version=1,
            to_stage=Stage.shadow,
            reason="ready",
            now=now,
        )
        transitions.decide(
            s,
            principal=Principal("alice", Role.approver),
            transition_id=t.id,
            decision="approve",
            comment=None,
            now=now,
        )
        tid = t.id
    with transaction(engine) as s:
        identities.link(s, identity="alice", mlflow_user=LOGIN, actor="root")
    with transaction(engine) as s:
        t = transitions.decide(
            s,
            principal=Principal("bob", Role.approver),
            transition_id=tid,
            decision="approve",
            comment=None,
            now=now,
        )
        gate = next(g for g in t.gate_results if g["gate"] == "approvals")
    assert t.status.value == "pending"
    assert gate["reason"].startswith("1 of 2 approvals")


def test_an_unmapped_author_blocks_approvals_by_policy(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator=LOGIN)
    set_unmapped(engine, "block")
    tid = open_shadow(client, people["erin"])
    r = approve(client, people["alice"], tid)
    assert r.status_code == 403
    detail = r.json()["detail"]
    assert f"MLflow user '{LOGIN}', is linked to no identity" in detail
    assert "stagegate token link" in detail
    # Linking the name lets approvals through (by anyone but the author).
    client.put(link_url("bob", LOGIN), headers=people["root"])
    r = approve(client, people["alice"], tid)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "approved"


def test_an_unmapped_author_can_still_be_rejected(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator=LOGIN)
    set_unmapped(engine, "block")
    r = approve(client, people["alice"], open_shadow(client, people["erin"]), "reject")
    assert r.status_code == 201
    assert r.json()["status"] == "rejected"


def test_warn_counts_the_approval_and_records_the_warning(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator=LOGIN)
    set_unmapped(engine, "warn")
    tid = open_shadow(client, people["erin"])
    r = approve(client, people["alice"], tid)
    assert r.status_code == 201
    body = r.json()
    assert body["status"] == "approved"
    gate = next(g for g in body["gates"] if g["gate"] == "approvals")
    warning = f"the author, MLflow user '{LOGIN}', is linked to no identity"
    assert gate["reason"] == f"1 of 1 approvals (admin/approver); warning: {warning}"
    [row] = actions(engine, "approval.approve")
    assert row.data["warning"] == warning
    [approved] = actions(engine, "transition.approved")
    assert warning in str(approved.data["gates"])


def _gate(author: AuthorFacts | None, *approvers: str) -> gates.GateResult:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    ctx = gates.GateContext(
        Stage.candidate,
        Stage.shadow,
        "erin",
        gates.VersionFacts("m", 1, Stage.candidate, "d", LOGIN),
        None,
        [gates.ApprovalFacts(a, Role.approver, True, "d", now) for a in approvers],
        default_policy(),
        now,
        author=author,
    )
    return gates.ApprovalsGate().check(ctx)


def test_the_approvals_gate_maps_the_author() -> None:
    linked = AuthorFacts(LOGIN, "alice", "block")
    assert not _gate(linked, "alice").passed  # the linked identity's approval is ignored
    assert _gate(linked, "bob").passed
    blocked = _gate(AuthorFacts(LOGIN, None, "block"), "bob")
    assert not blocked.passed
    assert "unmapped_author: block" in blocked.reason
    nameless = _gate(AuthorFacts(None, None, "block"), "bob")
    assert nameless.reason.startswith("the version records no MLflow author")
    assert "warning" in _gate(AuthorFacts(LOGIN, None, "warn"), "bob").reason
    assert _gate(None, "bob").passed  # without author facts: the raw name only, as before


def test_a_policy_that_says_nothing_blocks_in_prod_and_warns_in_dev(
    monkeypatch: pytest.MonkeyPatch, fresh_settings: None
) -> None:
    monkeypatch.setenv("STAGEGATE_MODE", "dev")
    assert identities.unmapped_handling(default_policy()) == "warn"
    get_settings.cache_clear()
    monkeypatch.setenv("STAGEGATE_MODE", "prod")
    monkeypatch.setenv("STAGEGATE_WEBHOOK__SECRET", "x" * 40)
    monkeypatch.setenv("STAGEGATE_DB__URL", "postgresql+psycopg://sg@127.0.0.1/sg")
    assert identities.unmapped_handling(default_policy()) == "block"
    # An explicit policy value wins over the mode.
    warn = default_policy().model_copy(update={"unmapped_author": "warn"})
    assert identities.unmapped_handling(warn) == "warn"


# -- one decision per person, expired or not --------------------------------------------------


def test_an_expired_approval_cannot_be_renewed_by_its_approver(
    engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator=LOGIN)
    with transaction(engine) as s:
        identities.link(s, identity="erin", mlflow_user=LOGIN, actor="test")
        # canary->production needs 2: alice approves, then lets a week pass.
        policy = default_policy()
        raised = [
            r.model_copy(update={"required": 2}) if Stage.shadow in r.to_stages else r
            for r in policy.approvals
        ]
        policies.set_policy(s, "fraud", policy.model_copy(update={"approvals": raised}), actor="t")
    start = datetime(2026, 6, 1, tzinfo=UTC)
    later = start + timedelta(days=8)
    alice = Principal("alice", Role.approver)
    with transaction(engine) as s:
        t, _ = transitions.request(
            s,
            principal=Principal("vic-service", Role.service),
            model="fraud",
            version=1,
            to_stage=Stage.shadow,
            reason="ready",
            now=start,
        )
        transitions.decide(
            s, principal=alice, transition_id=t.id, decision="approve", comment=None, now=start
        )
        tid = t.id
    with transaction(engine) as s, pytest.raises(ConflictError) as refused:
        transitions.decide(
            s, principal=alice, transition_id=tid, decision="approve", comment=None, now=later
        )
    assert "expired at 2026-06-08 00:00 UTC" in refused.value.detail
    assert "its approver cannot renew it" in refused.value.detail
    # bob's fresh approval is one of two: the expired one does not make up the second.
    with transaction(engine) as s:
        t = transitions.decide(
            s,
            principal=Principal("bob", Role.approver),
            transition_id=tid,
            decision="approve",
            comment=None,
            now=later,
        )
        assert t.status.value == "pending"
        version = versions.get_version(s, "fraud", 1)
        assert gates.counting_approvers(transitions._context(s, t, version, later)) == ["bob"]


def test_the_database_holds_one_decision_per_person(
    engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    """Two racing decisions by the same person: the unique constraint refuses the second."""
    factory.version("fraud", 1)
    with transaction(engine) as s:
        t, _ = transitions.request(
            s,
            principal=Principal("erin", Role.author),
            model="fraud",
            version=1,
            to_stage=Stage.shadow,
            reason="ready",
            now=datetime.now(UTC),
        )
        tid = t.id
    row = {"transition_id": tid, "approver": "alice", "role": Role.approver, "decision": "approve"}
    with transaction(engine) as s:
        s.add(Approval(**row))
    with Session(engine) as s:
        s.add(Approval(**row))
        with pytest.raises(IntegrityError):
            s.commit()


# -- the demo and the CLI -----------------------------------------------------------------------


def test_the_demo_links_the_login_mlflow_records_and_dana_is_refused(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    # MLflow's client tags runs with the OS user (`mlflow.user`); importing mlflow here would
    # start a process (`uname`), so the demo's own function stands in for it.
    assert demo.mlflow_login() == getpass.getuser()
    dana = factory.token("dana", "author")
    with transaction(engine) as s:
        assert demo.link_author(s, LOGIN)
    with transaction(engine) as s:
        assert not demo.link_author(s, LOGIN)  # a second demo run on the same home
    factory.version("fraud", 1, creator=LOGIN)
    set_unmapped(engine, "block")  # as in prod: the link alone lets approvals through
    tid = open_shadow(client, people["erin"])
    r = approve(client, dana, tid)
    assert r.status_code == 403
    assert f"(MLflow user '{LOGIN}' is linked to dana)" in r.json()["detail"]
    assert approve(client, people["alice"], tid).status_code == 201


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Result]:
    runner = CliRunner()
    env = {"STAGEGATE_HOME": str(tmp_path / "home"), "STAGEGATE_DB__URL": None}

    def invoke(*args: str) -> Result:
        get_settings.cache_clear()
        try:
            return runner.invoke(app, list(args), env=env)
        finally:
            get_settings.cache_clear()

    return invoke


def test_token_link_and_unlink_on_the_command_line(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    assert cli("token", "create", "dana", "--role", "author").exit_code == 0
    linked = cli("token", "link", "dana", LOGIN)
    assert linked.exit_code == 0, linked.output
    assert linked.stdout.strip() == f"linked MLflow user {LOGIN} -> dana"
    assert cli("token", "link", "dana", LOGIN).stdout.startswith("already linked")
    unknown = cli("token", "link", "nobody", "x")
    assert unknown.exit_code == 1
    assert "create a token for it first" in unknown.output
    engine = make_engine(Settings(home=tmp_path / "home").database_url)
    try:
        with transaction(engine, read_only=True) as s:
            assert [
                (r.mlflow_user, r.identity, r.linked_by) for r in s.exec(select(IdentityLink))
            ] == [(LOGIN, "dana", "cli")]
        assert cli("token", "unlink", "dana", LOGIN).exit_code == 0
        assert cli("token", "unlink", "dana", LOGIN).exit_code == 1
        with transaction(engine, read_only=True) as s:
            assert s.exec(select(IdentityLink)).all() == []
            assert [e.action for e in s.exec(select(AuditEntry).order_by(AuditEntry.seq))][-2:] == [
                "identity.linked",
                "identity.unlinked",
            ]
    finally:
        engine.dispose()


def test_migration_0007_adds_and_removes_links_and_policy_changes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trust.db'}"
    upgrade(url)
    engine = make_engine(url)
    added = {"identity_link", "policy_change"}
    try:
        assert added <= set(inspect(engine).get_table_names())
        command.downgrade(alembic_config(url), "0006")
        assert not added & set(inspect(engine).get_table_names())
        upgrade(url)
        assert added <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
