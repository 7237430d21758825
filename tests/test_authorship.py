"""Authorship attestation: an approver who registers a version under a colleague's linked
MLflow name gets it through under `authorship: registry`, and not under `attested`, where
approvals wait for an authenticated attestation and the attester may not approve."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from rich.console import Console
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlmodel import select
from typer.testing import CliRunner, Result

from stagegate.cli import app
from stagegate.db import make_engine, transaction
from stagegate.demo import Demo
from stagegate.governance import audit, identities, policies, transitions, versions
from stagegate.governance.models import AuditEntry, ModelVersion
from stagegate.governance.tokens import Principal
from stagegate.lifecycle import gates
from stagegate.lifecycle.gates import AuthorFacts
from stagegate.lifecycle.policy import Policy, default_policy
from stagegate.lifecycle.stages import Role, Stage
from stagegate.migrate import alembic_config, upgrade
from stagegate.settings import ApiSettings, Settings, get_settings
from tests.factories import Factory

Json = dict[str, Any]
DANA_LOGIN = "dana-laptop"  # dana's MLflow login, linked to her by an admin
URL = "/api/v1/models/fraud/versions/1/authorship"
SERVICE = Principal("stagegate", Role.service)  # intake opens the first transition
WAITING = "waiting for the author's attestation"


@pytest.fixture
def people(factory: Factory, engine: Engine) -> dict[str, dict[str, str]]:
    found = {
        "dana": factory.token("dana", "author"),
        "alice": factory.token("alice", "approver"),
        "bob": factory.token("bob", "approver"),
        "carol": factory.token("carol", "approver"),
        "root": factory.token("root", "admin"),
        "sam": factory.token("sam", "admin"),
        "vic": factory.token("vic", "viewer"),
        "svc": factory.token("svc", "service"),
    }
    with transaction(engine) as s:
        identities.link(s, identity="dana", mlflow_user=DANA_LOGIN, actor="root")
    return found


def policy(authorship: str | None, *, shadow_needs: int = 2) -> Policy:
    """The default, with candidate->shadow needing `shadow_needs` approvals."""
    base = default_policy()
    rules = [
        r.model_copy(update={"required": shadow_needs}) if Stage.shadow in r.to_stages else r
        for r in base.approvals
    ]
    return base.model_copy(update={"approvals": rules, "authorship": authorship})


def set_policy(engine: Engine, body: Policy) -> None:
    with transaction(engine) as s:
        policies.set_policy(s, "fraud", body, actor="test")


def alice_registers_as_dana(factory: Factory) -> None:
    """alice's MLflow client sends dana's login: MLflow records whatever it is sent."""
    factory.version("fraud", 1, creator=DANA_LOGIN)


def intake_requests(engine: Engine, to: Stage = Stage.shadow) -> str:
    with transaction(engine) as s:
        t, _ = transitions.request(
            s,
            principal=SERVICE,
            model="fraud",
            version=1,
            to_stage=to,
            reason="registered",
            now=datetime.now(UTC),
        )
        return t.id


def approve(client: TestClient, who: dict[str, str], tid: str, decision: str = "approve") -> Any:
    return client.post(
        f"/api/v1/transitions/{tid}/approvals", headers=who, json={"decision": decision}
    )


def gate_reason(body: Json, name: str = "approvals") -> str:
    reason: str = next(g["reason"] for g in body["gates"] if g["gate"] == name)
    return reason


def applied_stage(engine: Engine, tid: str) -> Stage:
    with transaction(engine) as s:
        transitions.apply(
            s, transition_id=tid, actor="stagegate", current_digest=None, now=datetime.now(UTC)
        )
    with transaction(engine, read_only=True) as s:
        return versions.get_version(s, "fraud", 1).stage


# -- the attack -------------------------------------------------------------------------------


def test_under_registry_an_approver_gets_her_own_version_through_under_a_colleagues_name(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    """The gap this closes: the name check passes alice, since the registry says dana."""
    set_policy(engine, policy("registry"))
    alice_registers_as_dana(factory)
    tid = intake_requests(engine)
    assert approve(client, people["alice"], tid).status_code == 201
    r = approve(client, people["bob"], tid)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "approved"
    assert applied_stage(engine, tid) is Stage.shadow


def test_under_attested_the_same_version_waits_and_its_attester_may_not_approve(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    set_policy(engine, policy("attested"))
    alice_registers_as_dana(factory)
    tid = intake_requests(engine)
    r = approve(client, people["alice"], tid)
    assert r.status_code == 403
    assert r.json()["detail"] == (
        f"{WAITING}: nobody has attested authorship of fraud v1 (the registry names dana); "
        "approvals count once its author does (stagegate versions attest fraud 1), as the "
        "policy says authorship: attested"
    )
    # The gate holds for the same reason, and the UI's disabled button says it too.
    shown = client.get(f"/api/v1/transitions/{tid}", headers=people["bob"]).json()
    assert shown["status"] == "pending"
    assert gate_reason(shown) == r.json()["detail"]
    assert shown["allowed_actions"]["approve"] == {"allowed": False, "reason": r.json()["detail"]}
    assert shown["allowed_actions"]["reject"] == {"allowed": True, "reason": None}

    # alice attests, to get it moving: she is then an author of record.
    attested = client.post(URL, headers=people["alice"])
    assert attested.status_code == 201, attested.text
    assert attested.json()["attested_by"] == "alice"
    r = approve(client, people["alice"], tid)
    assert r.status_code == 403
    assert r.json()["detail"] == (
        "alice attested authorship of fraud v1; "
        "the author of a version may not approve its transitions"
    )
    # Two other approvers are now needed: four eyes that are not hers.
    assert approve(client, people["bob"], tid).json()["status"] == "pending"
    r = approve(client, people["carol"], tid)
    assert r.json()["status"] == "approved"
    assert gate_reason(r.json()) == "2 of 2 approvals (admin/approver)"


def test_the_named_colleague_attests_then_others_may_approve(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    set_policy(engine, policy("attested"))
    factory.version("fraud", 1, creator=DANA_LOGIN)
    tid = intake_requests(engine)
    # dana sees her version waiting for her: the gate names her.
    waiting = client.get(f"/api/v1/transitions/{tid}", headers=people["dana"]).json()
    assert "(the registry names dana)" in gate_reason(waiting)

    r = client.post(URL, headers=people["dana"])
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["attested_by"] == "dana"
    assert body["attested_digest"] == body["digest"]
    assert datetime.fromisoformat(body["attested_at"]) > datetime.now(UTC) - timedelta(minutes=1)
    # The version view shows it to anyone.
    seen = client.get("/api/v1/models/fraud/versions/1", headers=people["vic"]).json()
    assert (seen["attested_by"], seen["attested_at"]) == ("dana", body["attested_at"])

    shown = client.get(f"/api/v1/transitions/{tid}", headers=people["alice"]).json()
    assert shown["allowed_actions"]["approve"] == {"allowed": True, "reason": None}
    assert gate_reason(shown).startswith("0 of 2 approvals")  # re-run at the attestation
    assert approve(client, people["dana"], tid).status_code == 403  # still the author
    assert approve(client, people["alice"], tid).status_code == 201
    r = approve(client, people["bob"], tid)
    assert r.json()["status"] == "approved"
    assert applied_stage(engine, tid) is Stage.shadow


def test_a_rejection_and_a_move_out_of_service_never_wait_for_an_attestation(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    set_policy(engine, policy("attested", shadow_needs=1))
    factory.version("fraud", 1, creator=DANA_LOGIN)
    factory.place("fraud", 1, Stage.production)
    # A rollback of an unattested champion: one approval, and it counts.
    tid = intake_requests(engine, Stage.rolled_back)
    r = approve(client, people["alice"], tid)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "approved"

    factory.version("fraud", 2, creator=DANA_LOGIN)
    with transaction(engine) as s:
        t, _ = transitions.request(
            s,
            principal=SERVICE,
            model="fraud",
            version=2,
            to_stage=Stage.shadow,
            reason="registered",
            now=datetime.now(UTC),
        )
        second = t.id
    r = approve(client, people["alice"], second, "reject")
    assert r.status_code == 201
    assert r.json()["status"] == "rejected"


def test_an_attesters_earlier_approval_stops_counting(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    """Given while the policy said registry: the gates run again at the attestation."""
    set_policy(engine, policy("registry"))
    factory.version("fraud", 1, creator=DANA_LOGIN)
    tid = intake_requests(engine)
    r = approve(client, people["alice"], tid)
    assert gate_reason(r.json()).startswith("1 of 2 approvals")
    set_policy(engine, policy("attested"))
    assert client.post(URL, headers=people["alice"]).status_code == 201
    shown = client.get(f"/api/v1/transitions/{tid}", headers=people["vic"]).json()
    assert gate_reason(shown).startswith("0 of 2 approvals")
    r = approve(client, people["bob"], tid)
    assert gate_reason(r.json()).startswith("1 of 2 approvals")


def test_an_attestation_is_bound_to_the_artifact(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    """A changed artifact voids the attestation, as it voids approvals: its author attests
    again (a second attestation is then allowed), and the first attester stays on record."""
    set_policy(engine, policy("attested", shadow_needs=1))
    factory.version("fraud", 1, creator=DANA_LOGIN)
    assert client.post(URL, headers=people["dana"]).status_code == 201
    factory.version("fraud", 1, creator=DANA_LOGIN, digest="f" * 64)  # the artifact changed
    tid = intake_requests(engine)
    r = approve(client, people["alice"], tid)
    assert r.status_code == 403
    assert r.json()["detail"].startswith(
        f"{WAITING}: fraud v1's artifact changed since dana attested it"
    )
    r = client.post(URL, headers=people["dana"])
    assert r.status_code == 201
    assert r.json()["attested_digest"] == "f" * 64
    with transaction(engine, read_only=True) as s:
        rows = s.exec(select(AuditEntry).where(AuditEntry.action == "version.attested")).all()
        assert [e.data.get("replaces") for e in rows] == [None, "dana"]
    assert approve(client, people["alice"], tid).json()["status"] == "approved"


# -- the endpoint -----------------------------------------------------------------------------


def test_one_attestation_per_version_first_wins(
    client: TestClient, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator=DANA_LOGIN)
    assert client.post(URL, headers=people["dana"]).status_code == 201
    for who in ("alice", "dana"):
        r = client.post(URL, headers=people[who])
        assert r.status_code == 409
        assert r.json()["code"] == "conflict"
        assert "is attested already, by dana at" in r.json()["detail"]
    seen = client.get("/api/v1/models/fraud/versions/1", headers=people["vic"]).json()
    assert seen["attested_by"] == "dana"


@pytest.mark.parametrize(("who", "status"), [(None, 401), ("vic", 403), ("svc", 403)])
def test_attesting_needs_a_person_who_writes_models(
    client: TestClient,
    factory: Factory,
    people: dict[str, dict[str, str]],
    who: str | None,
    status: int,
) -> None:
    factory.version("fraud", 1, creator=DANA_LOGIN)
    r = client.post(URL, headers=people[who] if who else {})
    assert r.status_code == status, r.text
    seen = client.get("/api/v1/models/fraud/versions/1", headers=people["vic"]).json()
    assert seen["attested_by"] is None


def test_an_unknown_version_is_404(client: TestClient, people: dict[str, dict[str, str]]) -> None:
    r = client.post(URL.replace("/1/", "/9/"), headers=people["dana"])
    assert r.status_code == 404


def test_the_attestation_and_its_audit_row_commit_together(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator=DANA_LOGIN)
    assert client.post(URL, headers=people["alice"]).status_code == 201
    with transaction(engine, read_only=True) as s:
        [row] = s.exec(select(AuditEntry).where(AuditEntry.action == "version.attested")).all()
        version = versions.get_version(s, "fraud", 1)
        assert (row.actor, row.entity_type, row.entity_id) == ("alice", "version", "fraud/1")
        assert row.data == {
            "digest": version.digest,
            "mlflow_user": DANA_LOGIN,
            "linked_identity": "dana",
        }
        assert audit.verify(s).ok


# -- the pure parts ---------------------------------------------------------------------------


def _gate(author: AuthorFacts, to: Stage, *approvers: str) -> gates.GateResult:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    frm = Stage.candidate if to in (Stage.shadow, Stage.rejected) else Stage.production
    ctx = gates.GateContext(
        frm,
        to,
        "stagegate",
        gates.VersionFacts("m", 1, frm, "d", DANA_LOGIN),
        None,
        [gates.ApprovalFacts(a, Role.approver, True, "d", now) for a in approvers],
        default_policy(),
        now,
        author=author,
    )
    return gates.ApprovalsGate().check(ctx)


def test_the_approvals_gate_waits_for_an_attestation_into_service_only() -> None:
    unattested = AuthorFacts(DANA_LOGIN, "dana", "block", "attested")
    held = _gate(unattested, Stage.shadow, "bob")
    assert not held.passed
    assert held.reason.startswith(WAITING)
    assert _gate(unattested, Stage.rolled_back, "bob").passed
    attested = AuthorFacts(DANA_LOGIN, "dana", "block", "attested", attester="alice", attested=True)
    assert _gate(attested, Stage.shadow, "bob").passed
    assert not _gate(attested, Stage.shadow, "alice").passed  # the attester's is ignored
    registry = AuthorFacts(DANA_LOGIN, "dana", "block", "registry")
    assert _gate(registry, Stage.shadow, "bob").passed


def test_a_policy_that_says_nothing_attests_in_prod_and_trusts_the_registry_in_dev(
    monkeypatch: pytest.MonkeyPatch, fresh_settings: None
) -> None:
    monkeypatch.setenv("STAGEGATE_MODE", "dev")
    assert identities.authorship_handling(default_policy()) == "registry"
    get_settings.cache_clear()
    monkeypatch.setenv("STAGEGATE_MODE", "prod")
    monkeypatch.setenv("STAGEGATE_WEBHOOK__SECRET", "x" * 40)
    monkeypatch.setenv("STAGEGATE_DB__URL", "postgresql+psycopg://sg@127.0.0.1/sg")
    assert identities.authorship_handling(default_policy()) == "attested"
    assert identities.authorship_handling(policy("registry")) == "registry"  # explicit wins
    # And the prod default holds approvals back, through the real gate.
    version = ModelVersion(model_name="m", version=1, source="s", creator="x", digest="d")
    facts = identities.author_of(version, "x-person", default_policy())
    assert facts.awaiting_attestation("m", 1, Stage.shadow) is not None


# -- weakening needs a second admin -----------------------------------------------------------


REGISTRY_WEAKENS = (
    "approvals no longer wait for an attested author: the MLflow author name, which the "
    "client sets, decides who wrote a version (authorship: registry)"
)


def test_registry_instead_of_attested_weakens() -> None:
    floor = 1
    assert policies.weakenings(policy("attested"), policy("registry"), floor=floor) == [
        REGISTRY_WEAKENS
    ]
    # Pinning registry weakens in any mode (dev's default would carry it into prod unseen).
    assert policies.weakenings(policy(None), policy("registry"), floor=floor) == [REGISTRY_WEAKENS]
    assert policies.weakenings(policy("registry"), policy("attested"), floor=floor) == []
    assert policies.weakenings(policy(None), policy("attested"), floor=floor) == []


def test_switching_to_registry_waits_for_a_second_admin(
    client: TestClient, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator=DANA_LOGIN)
    url = "/api/v1/models/fraud/policy"
    strict = policy("attested").model_dump(mode="json")
    assert client.put(url, headers=people["root"], json=strict).status_code == 200
    loose = policy("registry").model_dump(mode="json")
    r = client.put(url, headers=people["root"], json=loose)
    assert r.status_code == 202, r.text
    change = r.json()
    assert change["weakens"] == [REGISTRY_WEAKENS]
    assert client.get(url, headers=people["vic"]).json()["authorship"] == "attested"
    decide = f"/api/v1/policy-changes/{change['id']}/approvals"
    r = client.post(decide, headers=people["root"], json={"decision": "approve"})
    assert r.status_code == 403
    r = client.post(decide, headers=people["sam"], json={"decision": "approve"})
    assert r.status_code == 201, r.text
    assert client.get(url, headers=people["vic"]).json()["authorship"] == "registry"


# -- the command line and the demo -------------------------------------------------------------


@pytest.fixture
def cli(live_api_url: str) -> Callable[..., Result]:
    runner = CliRunner()

    def invoke(token: dict[str, str], *args: str) -> Result:
        secret = token["Authorization"].removeprefix("Bearer ")
        env = {"STAGEGATE_TOKEN": secret, "STAGEGATE_API_URL": live_api_url}
        return runner.invoke(app, list(args), env=env)

    return invoke


def test_versions_attest_on_the_command_line(
    cli: Callable[..., Result], engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    factory.version("fraud", 1, creator=DANA_LOGIN)
    done = cli(people["dana"], "versions", "attest", "fraud", "1")
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == (
        f"attested fraud v1 as dana (artifact {'0' * 12}, registry author {DANA_LOGIN})"
    )
    again = cli(people["alice"], "versions", "attest", "fraud", "1")
    assert again.exit_code == 1
    assert "409: fraud v1 is attested already, by dana" in again.output
    viewer = cli(people["vic"], "versions", "attest", "fraud", "1")
    assert viewer.exit_code == 1
    assert "403: role viewer may not do this" in viewer.output
    with transaction(engine, read_only=True) as s:
        assert versions.get_version(s, "fraud", 1).attested_by == "dana"


def test_the_demo_shows_the_wait_then_dana_attests_with_her_token(
    live_api_url: str, engine: Engine, factory: Factory, people: dict[str, dict[str, str]]
) -> None:
    set_policy(engine, policy("attested", shadow_needs=1))
    factory.version("fraud", 1, creator=DANA_LOGIN)
    tid = intake_requests(engine)
    out = io.StringIO()
    settings = Settings(api=ApiSettings(public_url=live_api_url))
    demo = Demo(settings, Console(file=out, width=400), model="fraud", headers=dict(people))
    try:
        demo.attest(1, tid)
        # alice's refused try left no approval; she may approve now.
        assert demo.approve("alice", tid)["status"] == "approved"
    finally:
        demo.api.close()
    said = out.getvalue()
    assert f"alice approves before dana attests: refused ({WAITING}" in said
    attested = "dana attests authorship of v1 with her token (the registry's name, MLflow user"
    assert f"{attested} '{DANA_LOGIN}'" in said
    with transaction(engine, read_only=True) as s:
        assert versions.get_version(s, "fraud", 1).attested_by == "dana"


def test_migration_0009_adds_and_removes_the_attestation_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'attest.db'}"
    added = {"attested_by", "attested_at", "attested_digest"}
    upgrade(url)
    engine = make_engine(url)
    try:
        columns = {c["name"] for c in inspect(engine).get_columns("model_version")}
        assert added <= columns
        command.downgrade(alembic_config(url), "0008")
        columns = {c["name"] for c in inspect(engine).get_columns("model_version")}
        assert not added & columns
        upgrade(url)
        assert added <= {c["name"] for c in inspect(engine).get_columns("model_version")}
    finally:
        engine.dispose()
