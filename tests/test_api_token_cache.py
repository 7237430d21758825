"""The API's token cache: what it saves, and the bounds it keeps on revocation and expiry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from stagegate.api.app import create_app
from stagegate.db import transaction, utcnow
from stagegate.events.sink import MemorySink
from stagegate.governance import tokens
from stagegate.lifecycle.stages import Role
from stagegate.settings import ApiSettings, Settings
from tests.factories import auth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _app(settings: Settings, engine: Engine, ttl_s: float) -> TestClient:
    tuned = settings.model_copy(update={"api": ApiSettings(token_cache_s=ttl_s)})
    return TestClient(create_app(tuned, engine=engine, sink=MemorySink()))


def _token(engine: Engine, name: str, **kw: Any) -> str:
    with transaction(engine) as s:
        return tokens.create_token(s, name=name, role=Role.viewer, **kw)


@pytest.fixture
def token_queries(engine: Engine) -> Iterator[list[str]]:
    """The statements that read the token table."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM api_token" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    yield seen
    event.remove(engine, "before_cursor_execute", count)


def _revoke_elsewhere(engine: Engine, name: str) -> None:
    """What `stagegate token revoke` in another process does, as this process sees it: the row
    changes, and nothing in this process hears of it."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE api_token SET revoked_at = :at WHERE name = :n"),
            {"at": utcnow().replace(tzinfo=None), "n": name},
        )


def test_a_verified_token_skips_the_token_query_and_ttl_zero_turns_that_off(
    settings: Settings, engine: Engine, token_queries: list[str]
) -> None:
    secret = _token(engine, "vic")
    token_queries.clear()  # creating it looked for the name's other tokens
    with _app(settings, engine, ttl_s=5) as client:
        for _ in range(3):
            assert client.get("/api/v1/models", headers=auth(secret)).status_code == 200
    assert len(token_queries) == 1
    token_queries.clear()
    with _app(settings, engine, ttl_s=0) as client:
        for _ in range(3):
            assert client.get("/api/v1/models", headers=auth(secret)).status_code == 200
    assert len(token_queries) == 3


def test_a_revocation_committed_in_this_process_is_refused_at_once(
    settings: Settings, engine: Engine
) -> None:
    secret = _token(engine, "temp")
    with _app(settings, engine, ttl_s=60) as client:
        assert client.get("/api/v1/models", headers=auth(secret)).status_code == 200
        with transaction(engine) as s:
            tokens.revoke_token(s, name="temp")
        r = client.get("/api/v1/models", headers=auth(secret))
        assert (r.status_code, r.json()["detail"]) == (401, "token revoked")


def test_a_revocation_rolled_back_leaves_the_cache_alone(engine: Engine) -> None:
    secret = _token(engine, "kept")
    cache = tokens.TokenCache(ttl_s=60)
    with transaction(engine) as s:
        cache.put(secret, tokens.authenticate(s, secret), cache.generation())

    def revoke_then_fail() -> None:
        with transaction(engine) as s:
            tokens.revoke_token(s, name="kept")
            raise RuntimeError("abandon the revocation")

    with pytest.raises(RuntimeError):
        revoke_then_fail()
    assert cache.get(secret, utcnow()) == tokens.Principal("kept", Role.viewer)


def test_a_revocation_elsewhere_is_refused_within_the_ttl(engine: Engine) -> None:
    """The documented staleness: at most `ttl_s` after another process revokes."""
    secret = _token(engine, "remote")
    clock = Clock()
    cache = tokens.TokenCache(ttl_s=5, clock=clock)
    with transaction(engine) as s:
        cache.put(secret, tokens.authenticate(s, secret), cache.generation())
    _revoke_elsewhere(engine, "remote")
    clock.now += 4.9
    assert cache.get(secret, utcnow()) is not None  # within the bound, the cache still answers
    clock.now += 0.1
    assert cache.get(secret, utcnow()) is None  # the bound: back to the database, which refuses
    with transaction(engine) as s, pytest.raises(tokens.TokenRejected, match="token revoked"):
        tokens.authenticate(s, secret)


def test_an_answer_read_before_a_revocation_committed_is_not_cached(engine: Engine) -> None:
    """A request that verified the token while a revocation was committing must not store
    the old answer: the generation read before the query no longer matches."""
    secret = _token(engine, "racy")
    cache = tokens.TokenCache(ttl_s=60)
    generation = cache.generation()
    with transaction(engine) as s:
        principal = tokens.authenticate(s, secret)  # still live
    with transaction(engine) as s:
        tokens.revoke_token(s, name="racy")
    cache.put(secret, principal, generation)
    assert cache.get(secret, utcnow()) is None


def test_expiry_holds_to_the_instant_with_the_token_cached(
    settings: Settings, engine: Engine
) -> None:
    lifetime = timedelta(hours=1)
    # Expires about a second from now, far inside the 60 s the cache would otherwise trust it.
    start = utcnow() - lifetime + timedelta(seconds=1)
    secret = _token(engine, "brief", expires_in=lifetime, now=start)
    with _app(settings, engine, ttl_s=60) as client:
        assert client.get("/api/v1/models", headers=auth(secret)).status_code == 200
        deadline = time.monotonic() + 5
        while (r := client.get("/api/v1/models", headers=auth(secret))).status_code == 200:
            assert time.monotonic() < deadline, "an expired token was still served from cache"
            time.sleep(0.05)
        assert (r.status_code, r.json()["detail"]) == (401, "token expired")


def test_the_cache_keeps_no_secret_and_stays_bounded(engine: Engine) -> None:
    cache = tokens.TokenCache(ttl_s=60, max_entries=3)
    secrets = [_token(engine, f"t{i}") for i in range(5)]
    with transaction(engine) as s:
        for secret in secrets:
            cache.put(secret, tokens.authenticate(s, secret), cache.generation())
    kept = cache._entries
    assert 0 < len(kept) <= 3
    assert not any(secret in key for key in kept for secret in secrets)
    assert set(kept) <= {tokens.hash_token(secret) for secret in secrets}
