"""Shared fixtures: a real governance database (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import make_url, text
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

from stagegate.api.app import create_app
from stagegate.db import make_engine
from stagegate.events.sink import MemorySink
from stagegate.migrate import upgrade
from stagegate.settings import Settings, get_settings
from tests.factories import Factory

pytest_plugins = ["tests.fixtures.mlflow_server", "pytester"]  # pytester: test_slow_marker.py

PG_URL = os.environ.get("STAGEGATE_TEST_PG_URL")  # set by `make test`, which starts PostgreSQL
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]

# -- the `slow` marker: every test that starts a process -------------------------------------
# Shared fixtures that start processes: a test that uses one, directly or through another
# fixture, is marked `slow` here. Tests and module fixtures that start their own processes
# carry `@pytest.mark.slow` (or a module `pytestmark`) themselves; `e2e` implies `slow`.
PROCESS_FIXTURES = frozenset({"mlflow_server"})
_SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork"}
)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("e2e") or uses & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.slow)
    _share_xdist_groups(config, items)


# -- pytest-xdist: `make test` runs `-n 2 --dist loadgroup` ----------------------------------
# A test in no group goes to whichever worker is free; a group runs whole, in order, on one
# worker. So a session process fixture starts once per run (its users share one group), and a
# slow module's module-scoped processes start once (its tests are grouped by module). Fast
# tests stay ungrouped: they spread evenly and fill the end of the run.
#
# pytest-xdist 3.8's own loadgroup renames nodeids to carry the group, which pytest 9.2 no
# longer lets a plugin do, so it silently schedules test by test. Here the workers write the
# groups to a file when they collect, and the controller's scheduler reads them from it.


def xdist_group(item: pytest.Item, uses: set[str]) -> str | None:
    """The group a test runs in under `--dist loadgroup`, or None for any free worker."""
    if marker := item.get_closest_marker("xdist_group"):  # a test may still name its own
        return str(marker.args[0] if marker.args else marker.kwargs.get("name", "default"))
    if shared := sorted(uses & PROCESS_FIXTURES):
        return "+".join(shared)
    if item.get_closest_marker("slow"):
        return item.path.stem
    return None


_GROUPS_KEY = "stagegate_xdist_groups"  # in each worker's `workerinput`: the groups file
_GROUPS_PATH = pytest.StashKey[Path]()
_REPEAT = "\x00"  # joins a repeated nodeid to its count: no nodeid contains it


def _groups_path(config: pytest.Config) -> Path:
    if _GROUPS_PATH not in config.stash:
        folder = Path(tempfile.mkdtemp(prefix="stagegate-xdist-"))
        config.stash[_GROUPS_PATH] = folder / "groups.json"
    return config.stash[_GROUPS_PATH]


def _share_xdist_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a worker, write {nodeid: group}; every worker collects the same, so the last write
    (atomic) wins and the controller reads the same groups whichever it was."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is None or _GROUPS_KEY not in workerinput:
        return
    groups = {
        item.nodeid: group
        for item in items
        if (group := xdist_group(item, set(getattr(item, "fixturenames", ()))))
    }
    path = Path(workerinput[_GROUPS_KEY])
    partial = path.with_name(f"{path.name}.{workerinput['workerid']}")
    partial.write_text(json.dumps(groups))
    partial.replace(path)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: known only while xdist is installed
def pytest_configure_node(node: Any) -> None:
    node.workerinput[_GROUPS_KEY] = str(_groups_path(node.config))


@pytest.hookimpl(optionalhook=True)  # runs before xdist's own (trylast) scheduler factory
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    path = _groups_path(config)

    class GroupScheduling(LoadScopeScheduling):
        """xdist's loadgroup, with the groups from the workers' file. Scopes are sent
        largest first, so the groups start early and the single tests come last."""

        groups: dict[str, str] | None = None

        def add_node_collection(self, node: Any, collection: Sequence[str]) -> None:
            # Scopes hold tests by nodeid, and schemathesis (4.32, under pytest 9.2) gives all
            # of test_fuzz_api's operation tests one nodeid: all but one would never run.
            # Repeats get a numbered suffix (the same on every worker, which collect alike).
            seen: Counter[str] = Counter()
            unique = []
            for nodeid in collection:
                seen[nodeid] += 1
                unique.append(nodeid if seen[nodeid] == 1 else f"{nodeid}{_REPEAT}{seen[nodeid]}")
            super().add_node_collection(node, unique)

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # first asked once every worker has collected
                self.groups = json.loads(path.read_text()) if path.exists() else {}
            return self.groups.get(nodeid.split(_REPEAT, maxsplit=1)[0], nodeid)

    return GroupScheduling(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _GROUPS_PATH in config.stash:
        shutil.rmtree(config.stash[_GROUPS_PATH].parent, ignore_errors=True)


class ProcessInFastTest(RuntimeError):
    """A test not marked `slow` tried to start a process (refused, so `-m "not slow"` stays
    fast and process-free)."""


class _SpawnGuard:
    """An audit hook (hooks cannot be removed, so it is installed once and switched per test)
    that refuses process starts from the main thread while a test without `slow` runs."""

    def __init__(self) -> None:
        self.fast_test: str | None = None
        self.refused: list[str] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.fast_test is None or event not in _SPAWN_EVENTS:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # a background thread of some earlier slow test's fixture, not this test
        what = f"{event} {args[1] if event == 'subprocess.Popen' else args[:1]!r}"
        self.refused.append(what)
        raise ProcessInFastTest(
            f"{self.fast_test} starts a process ({what}) but is not marked slow: add "
            "@pytest.mark.slow, or use a fixture listed in PROCESS_FIXTURES (tests/conftest.py)"
        )


_guard = _SpawnGuard()
sys.addaudithook(_guard)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    _guard.fast_test = None if item.get_closest_marker("slow") else item.nodeid
    _guard.refused.clear()
    try:
        return (yield)
    finally:
        _guard.fast_test = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    result = yield
    if _guard.refused:  # refused, but something swallowed the error: still a failure
        pytest.fail(f"{item.nodeid} tried to start a process: {_guard.refused[0]}")
    return result


def worker_database(base_url: str) -> str:
    """`base_url` for a lone run; under pytest-xdist, a database of this worker's own beside it
    (created when missing), so that parallel workers never empty each other's tables."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...: set in xdist's workers
    if not worker:
        return base_url
    base = make_url(base_url)
    name = f"{base.database}_{worker}"
    admin = make_engine(base_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}):
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


def _migrated(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'governance.db'}"
    else:
        assert PG_URL is not None
        url = worker_database(PG_URL)
        scratch = make_engine(url)
        with scratch.begin() as conn:  # a previous run may have left tables
            conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        scratch.dispose()
    upgrade(url)
    return make_engine(url)


@pytest.fixture(scope="session")
def _databases() -> Iterator[dict[str, Engine]]:
    """The migrated databases by backend, kept for the whole run: pytest tears a parametrized
    session fixture down whenever the next test wants the other param, which happens often
    under xdist (a worker's tests come in the scheduler's order, not sorted by backend)."""
    engines: dict[str, Engine] = {}
    yield engines
    for engine in engines.values():
        engine.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_engine(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    _databases: dict[str, Engine],
) -> Engine:
    """One migrated database per backend for the whole run (migrations run for real)."""
    backend: str = request.param
    if backend not in _databases:
        _databases[backend] = _migrated(backend, tmp_path_factory)
    return _databases[backend]


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
def fresh_settings() -> Iterator[None]:
    """`get_settings()` reads the environment again, before and after the test."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


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


@contextlib.contextmanager
def live_api(settings: Settings, engine: Engine, sink: MemorySink | None = None) -> Iterator[str]:
    """The API on a real socket (uvicorn in a thread), for clients that are real processes."""
    from tests.fixtures.mlflow_server import free_port  # a plugin: registered, then imported

    port = free_port()
    app = create_app(settings, engine=engine, sink=sink or MemorySink())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the API did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_api_url(settings: Settings, engine: Engine) -> Iterator[str]:
    with live_api(settings, engine) as url:
        yield url
