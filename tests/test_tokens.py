"""Tokens: expiry, the platform's reserved identities, and a listing that shows no secret."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import select

from stagegate import embedded
from stagegate.db import make_engine, transaction, utcnow
from stagegate.errors import ConflictError, InvalidInput
from stagegate.governance import deliveries, tokens
from stagegate.governance.models import AuditEntry
from stagegate.lifecycle.stages import Role
from stagegate.migrate import alembic_config, upgrade
from stagegate.steps.common import SERVICE
from tests.factories import auth


def _create(engine: Engine, name: str, role: Role = Role.viewer, **kw: Any) -> str:
    with transaction(engine) as s:
        return tokens.create_token(s, name=name, role=role, **kw)


def _models(client: TestClient, secret: str) -> tuple[int, str]:
    r = client.get("/api/v1/models", headers=auth(secret))
    return r.status_code, r.json().get("detail", "")


# -- expiry ----------------------------------------------------------------------------------


def test_an_expired_token_is_401_saying_so(client: TestClient, engine: Engine) -> None:
    an_hour_ago = utcnow() - timedelta(hours=1)
    expired = _create(engine, "temp", expires_in=timedelta(minutes=30), now=an_hour_ago)
    fresh = _create(engine, "fresh", expires_in=timedelta(days=30))
    forever = _create(engine, "forever")

    status, detail = _models(client, expired)
    assert (status, detail) == (401, "token expired")
    assert _models(client, fresh)[0] == 200
    assert _models(client, forever)[0] == 200
    r = client.get("/api/v1/models", headers=auth(expired))
    assert r.json()["code"] == "unauthenticated"
    assert r.headers["www-authenticate"] == "Bearer"


def test_unknown_and_revoked_tokens_say_which(client: TestClient, engine: Engine) -> None:
    secret = _create(engine, "gone")
    with transaction(engine) as s:
        tokens.revoke_token(s, name="gone")
    assert _models(client, secret) == (401, "token revoked")
    assert _models(client, "sg_" + "x" * 43) == (401, "invalid token")
    assert _models(client, "not-even-ours") == (401, "invalid token")


def test_a_token_stops_at_its_expiry_instant(engine: Engine) -> None:
    start = utcnow()
    secret = _create(engine, "edge", expires_in=timedelta(hours=1), now=start)
    with transaction(engine) as s:
        ok = tokens.authenticate(s, secret, now=start + timedelta(minutes=59, seconds=59))
        assert ok == tokens.Principal("edge", Role.viewer)
        with pytest.raises(tokens.TokenRejected, match="token expired"):
            tokens.authenticate(s, secret, now=start + timedelta(hours=1))


def test_the_expiry_is_in_the_audit_row(engine: Engine) -> None:
    start = utcnow()
    _create(engine, "audited", expires_in=timedelta(days=30), now=start)
    with transaction(engine) as s:
        row = s.exec(select(AuditEntry).where(AuditEntry.action == "token.created")).one()
    assert row.data["expires_at"] == (start + timedelta(days=30)).isoformat()


@pytest.mark.parametrize(
    ("text_", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("2w", timedelta(weeks=2)),
        ("45s", timedelta(seconds=45)),
        (" 7d ", timedelta(days=7)),
        ("3650d", timedelta(days=3650)),
    ],
)
def test_lifetimes_parse(text_: str, expected: timedelta) -> None:
    assert tokens.parse_lifetime(text_) == expected


@pytest.mark.parametrize(
    "text_", ["", "30", "d", "0d", "-1d", "1.5d", "30 days", "3651d", "99999999d", "1y"]
)
def test_bad_lifetimes_are_refused_with_the_reason(text_: str) -> None:
    with pytest.raises(InvalidInput, match="lifetime"):
        tokens.parse_lifetime(text_)


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(seconds=-1), timedelta(days=3651)])
def test_create_refuses_lifetimes_out_of_range(engine: Engine, lifetime: timedelta) -> None:
    with pytest.raises(InvalidInput, match="lives"):
        _create(engine, "x", expires_in=lifetime)


def test_an_expired_token_holds_no_role_any_more(engine: Engine) -> None:
    _create(engine, "erin", Role.approver)
    with pytest.raises(ConflictError, match="one role per identity"):
        _create(engine, "erin", Role.admin)
    past = utcnow() - timedelta(days=2)
    _create(engine, "frank", Role.approver, expires_in=timedelta(days=1), now=past)
    _create(engine, "frank", Role.admin)  # frank's approver token expired a day ago


# -- reserved identities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["stagegate", "mlflow-webhook", "stagegate-router", "Stagegate", "MLFLOW-WEBHOOK"]
)
def test_reserved_identities_are_refused(engine: Engine, name: str) -> None:
    with pytest.raises(InvalidInput, match="reserved for the platform"):
        _create(engine, name, Role.service)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM api_token")).scalar_one() == 0


def test_the_platform_still_registers_its_router_token(engine: Engine) -> None:
    secret = tokens.PREFIX + "r" * 43
    with transaction(engine) as s:
        assert tokens.ensure_token(
            s, name=embedded.ROUTER_IDENTITY, role=Role.service, secret=secret, actor="stagegate"
        )
    with transaction(engine) as s:
        assert tokens.authenticate(s, secret).name == "stagegate-router"


def test_the_reserved_names_are_the_ones_the_platform_acts_under(engine: Engine) -> None:
    with transaction(engine) as s:
        deliveries.accept_once(
            s, delivery_id="d1", entity="model_version", action="created", summary={}
        )
        webhook_actor = s.exec(select(AuditEntry)).one().actor
    assert {SERVICE.name, embedded.ROUTER_IDENTITY, webhook_actor} == tokens.RESERVED_NAMES


@pytest.mark.parametrize("name", ["", " alice", "a b", "-lead", "x" * 101, "a\nb", "café"])
def test_names_are_short_printable_identities(engine: Engine, name: str) -> None:
    with pytest.raises(InvalidInput, match="token name"):
        _create(engine, name)


# -- listing ---------------------------------------------------------------------------------


def test_the_list_shows_each_token_and_its_state_but_no_secret(engine: Engine) -> None:
    now = utcnow()
    secrets = [
        _create(engine, "alice", Role.approver, expires_in=timedelta(days=30), now=now),
        _create(engine, "bob", expires_in=timedelta(hours=1), now=now - timedelta(hours=2)),
        _create(engine, "carol"),
    ]
    with transaction(engine) as s:
        tokens.revoke_token(s, name="carol")
    with transaction(engine, read_only=True) as s:
        listed = tokens.list_tokens(s)
    assert [(t.name, t.role, t.status) for t in listed] == [
        ("alice", Role.approver, "active"),
        ("bob", Role.viewer, "expired"),
        ("carol", Role.viewer, "revoked"),
    ]
    assert listed[0].expires_at == now + timedelta(days=30)
    assert listed[2].expires_at is None
    assert listed[2].revoked_at is not None
    shown = repr(listed)
    for secret in secrets:
        assert secret not in shown
        assert tokens.hash_token(secret) not in shown


# -- migration -------------------------------------------------------------------------------


def test_migration_0005_adds_and_removes_the_expiry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'expiry.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        assert "expires_at" in {c["name"] for c in inspect(engine).get_columns("api_token")}
        command.downgrade(alembic_config(url), "0004")
        assert "expires_at" not in {c["name"] for c in inspect(engine).get_columns("api_token")}
        upgrade(url)
        assert "expires_at" in {c["name"] for c in inspect(engine).get_columns("api_token")}
    finally:
        engine.dispose()
