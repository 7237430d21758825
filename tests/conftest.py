"""Shared fixtures: a real governance database (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from stagegate.api.app import create_app
from stagegate.db import make_engine
from stagegate.events.sink import MemorySink
from stagegate.migrate import upgrade
from stagegate.settings import Settings
from tests.factories import Factory

pytest_plugins = ["tests.fixtures.mlflow_server"]

PG_URL = os.environ.get("STAGEGATE_TEST_PG_URL")  # set by `make test`, which starts PostgreSQL
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """One migrated database per backend for the whole run (migrations run for real)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'governance.db'}"
    else:
        assert PG_URL is not None
        url = PG_URL
        scratch = make_engine(url)
        with scratch.begin() as conn:  # a previous run may have left tables
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        scratch.dispose()
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def engine(migrated_engine: Engine) -> Iterator[Engine]:
    """The migrated database, emptied after each test."""
    yield migrated_engine
    with migrated_engine.begin() as conn:
        for table in reversed(SQLModel.metadata.sorted_tables):
            conn.execute(table.delete())
        conn.execute(
            text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, :h)"), {"h": "0" * 64}
        )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def client(settings: Settings, engine: Engine, sink: MemorySink) -> Iterator[TestClient]:
    app = create_app(settings, engine=engine, sink=sink)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def factory(engine: Engine) -> Factory:
    return Factory(engine)


@pytest.fixture
def live_api_url(settings: Settings, engine: Engine) -> Iterator[str]:
    """The API on a real socket (uvicorn in a thread), for clients that are real processes."""
    from tests.fixtures.mlflow_server import free_port  # a plugin: registered, then imported

    port = free_port()
    app = create_app(settings, engine=engine, sink=MemorySink())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
