"""Outages of what Stagegate stands on: the governance database and MLflow.

Issue "Trust" asks for 60 s outages; these tests hold the database down 10 s and MLflow for
the length of a few step runs, so the file stays well under a minute. The property is the same:
nothing waits on the outage's length (every answer during it is immediate), and recovery is
measured from the moment the dependency is back.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from stagegate.api.app import create_app
from stagegate.db import make_engine, transaction, utcnow
from stagegate.errors import RetryableError
from stagegate.events.signature import sign
from stagegate.events.sink import MemorySink
from stagegate.governance import audit, endpoints, policies, transitions, versions
from stagegate.governance.models import TransitionStatus
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.policy import default_policy
from stagegate.lifecycle.stages import Role, Stage
from stagegate.migrate import upgrade
from stagegate.registry.protocol import STAGE_TAG
from stagegate.settings import DEV_WEBHOOK_SECRET, Settings
from stagegate.stack import default_specs, load_secrets
from stagegate.steps.apply import apply_transition
from stagegate.steps.converge import DataPlane
from stagegate.steps.intake import intake
from stagegate.steps.reconcile import reconcile
from tests.factories import Factory
from tests.fakes import FakeBackend, FakeRegistry
from tests.fixtures import mlflow_server as mlflow_fixture

ROOT = Path(__file__).resolve().parents[1]
PG_SCRIPT = ROOT / "tests" / "support" / "postgres.sh"
PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
DB_DOWN_S = 10.0  # the 60 s, shortened: every answer while down is immediate anyway
RECOVERY_LIMIT_S = 30.0

Json = dict[str, Any]


# -- a PostgreSQL of our own, stopped and started under the API ------------------------------


@dataclass
class Postgres:
    """A throwaway server (tests/support/postgres.sh) that this test may stop and start: never
    the suite's shared one, which other tests are using."""

    directory: Path
    port: int
    url: str

    def _pg_ctl(self, *args: str) -> None:
        pg_ctl = str(Path(PG_BINS[-1]).with_name("pg_ctl"))
        argv = [pg_ctl, "-D", str(self.directory / "data"), *args]
        if os.getuid() == 0:  # pg_ctl refuses root, as in postgres.sh
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "-w", "stop")  # connections are cut, as in a crash or failover

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._pg_ctl("-l", str(self.directory / "server.log"), "-w", "-o", options, "start")


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    if not PG_BINS:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb)")
    # Under /tmp itself: pytest's tmp_path is private to root, and the server runs as postgres.
    directory = Path(f"/tmp/stagegate-outage-pg-{uuid.uuid4().hex[:12]}")
    port = mlflow_fixture.free_port()
    done = subprocess.run(
        [str(PG_SCRIPT), "start", str(directory), str(port)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        yield Postgres(directory, port, done.stdout.strip())
    finally:
        subprocess.run([str(PG_SCRIPT), "stop", str(directory)], check=False, timeout=60)


@contextlib.contextmanager
def live_api(settings: Settings, engine: Engine) -> Iterator[str]:
    """The API on a real socket (uvicorn in a thread), as tests/conftest.py `live_api_url`."""
    port = mlflow_fixture.free_port()
    app = create_app(settings, engine=engine, sink=MemorySink())
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


def _assert_unavailable(response: httpx.Response, what: str) -> None:
    """503 with Retry-After and the API's JSON error shape: the client knows to come back."""
    assert response.status_code == 503, f"{what}: {response.status_code} {response.text}"
    assert int(response.headers["Retry-After"]) >= 1, what
    body = response.json()
    assert set(body) == {"detail", "code"}, body
    assert body["code"] == "retryable", body
    assert "database" in body["detail"], body


def _approvals(engine: Engine, tid: str) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT approver, count(*) FROM approval WHERE transition_id = :t GROUP BY 1"),
            {"t": tid},
        ).all()
    return {str(who): int(n) for who, n in rows}


@pytest.mark.slow
def test_a_database_outage_answers_503_loses_no_acked_approval_and_recovers_alone(
    postgres: Postgres, tmp_path: Path
) -> None:
    upgrade(postgres.url)
    engine = make_engine(postgres.url)  # the engine the API runs with (pre-ping on)
    factory = Factory(engine)
    people = {
        "erin": factory.token("erin", "author"),
        "alice": factory.token("alice", "approver"),
        "bob": factory.token("bob", "approver"),
        "root": factory.token("root", "admin"),
    }
    factory.version("fraud", 1)
    with transaction(engine) as s:
        # Two approvals, so the transition is still pending after the first one.
        policy = default_policy()
        raised = [
            r.model_copy(update={"required": 2}) if Stage.shadow in r.to_stages else r
            for r in policy.approvals
        ]
        policies.set_policy(s, "fraud", policy.model_copy(update={"approvals": raised}), actor="t")
        pending, _ = transitions.request(
            s,
            principal=Principal("erin", Role.author),
            model="fraud",
            version=1,
            to_stage=Stage.shadow,
            reason="ready",
            now=utcnow(),
        )
    tid = pending.id
    approve = {"decision": "approve", "comment": "looks fine"}
    decide_url = f"/api/v1/transitions/{tid}/approvals"

    with (
        live_api(Settings(home=tmp_path / "home"), engine) as url,
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        acked = api.post(decide_url, headers=people["alice"], json=approve)
        assert acked.status_code == 201, acked.text
        assert acked.json()["status"] == "pending"

        postgres.stop()
        down_at = time.monotonic()
        writes = {
            "POST approval": lambda: api.post(decide_url, headers=people["bob"], json=approve),
            "POST transition": lambda: api.post(
                "/api/v1/transitions",
                headers=people["erin"],
                json={"model": "fraud", "version": 1, "to_stage": "rejected", "reason": "r"},
            ),
            "PUT policy": lambda: api.put(
                "/api/v1/models/fraud/policy",
                headers=people["root"],
                json=json.loads(default_policy().model_dump_json()),
            ),
        }
        reads = {
            "GET transition": lambda: api.get(f"/api/v1/transitions/{tid}", headers=people["bob"]),
            "GET models": lambda: api.get("/api/v1/models", headers=people["bob"]),
            "GET audit": lambda: api.get("/api/v1/audit", headers=people["root"]),
        }
        rounds = 0
        while time.monotonic() - down_at < DB_DOWN_S:  # ask again and again while it is down
            for what, call in {**writes, **reads}.items():
                started = time.monotonic()
                _assert_unavailable(call(), what)
                assert time.monotonic() - started < 5, f"{what} hung while the database was down"
            health = api.get("/api/health")
            _assert_unavailable(health, "GET /api/health")  # a probe sees the database down
            rounds += 1
            time.sleep(0.5)
        assert rounds >= 3

        postgres.start()
        back_at = time.monotonic()
        while api.get("/api/health").status_code != 200:
            assert time.monotonic() - back_at < RECOVERY_LIMIT_S, "the API did not recover"
            time.sleep(0.2)
        recovered_s = time.monotonic() - back_at
        print(f"\nAPI recovered {recovered_s:.2f} s after PostgreSQL was back (no restart)")

        # The approval acknowledged before the outage is there; bob's, refused while the
        # database was down, is retried now: recorded once, and a repeat is a conflict.
        seen = api.get(f"/api/v1/transitions/{tid}", headers=people["bob"])
        assert seen.status_code == 200, seen.text
        assert seen.json()["status"] == "pending"
        retried = api.post(decide_url, headers=people["bob"], json=approve)
        assert retried.status_code == 201, retried.text
        assert retried.json()["status"] == TransitionStatus.approved.value
        again = api.post(decide_url, headers=people["bob"], json=approve)
        assert again.status_code == 409, again.text
        assert _approvals(engine, tid) == {"alice": 1, "bob": 1}
        # Nothing the refused writes asked for happened.
        policy_now = api.get("/api/v1/models/fraud/policy", headers=people["root"]).json()
        shadow_rule = next(r for r in policy_now["approvals"] if "shadow" in r["to_stages"])
        assert shadow_rule["required"] == 2
        listed = api.get("/api/v1/transitions?model=fraud", headers=people["bob"]).json()
        assert [t["id"] for t in listed["data"]] == [tid]
        verified = api.get("/api/v1/audit/verify", headers=people["root"])
        assert verified.status_code == 200, verified.text
        assert verified.json()["ok"] is True, verified.text
    engine.dispose()


# -- MLflow down while intake and apply need it ----------------------------------------------


@contextlib.contextmanager
def mlflow_at(
    root: Path, port: int, monkeypatch: pytest.MonkeyPatch
) -> Iterator[mlflow_fixture.MlflowServer]:
    """The fixture's `mlflow server` on a port of our choosing, so that a restart over the same
    store comes back at the address the registry client already holds."""
    with monkeypatch.context() as patch:
        patch.setattr(mlflow_fixture, "free_port", lambda: port)
        running = mlflow_fixture.run_mlflow_server(root)
        server = running.__enter__()
    try:
        yield server
    finally:
        running.__exit__(None, None, None)


def _signed(settings: Settings, body: Json) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    delivery_id, stamp = str(uuid.uuid4()), int(time.time())
    return raw, {
        "x-mlflow-delivery-id": delivery_id,
        "x-mlflow-timestamp": str(stamp),
        "x-mlflow-signature": sign(settings.webhook.secret, delivery_id, stamp, raw),
        "content-type": "application/json",
    }


@pytest.mark.slow
def test_an_mlflow_outage_is_retryable_spares_the_api_and_reconcile_catches_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from stagegate.registry.mlflow import MlflowRegistry

    # mlflow's own HTTP retries default to minutes of backoff; the steps' callers retry instead.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    db_url = f"sqlite:///{tmp_path / 'governance.db'}"
    upgrade(db_url)  # its own SQLite: one MLflow cycle per run, whatever backends the suite has
    engine = make_engine(db_url)
    sink = MemorySink()
    settings = Settings(home=tmp_path / "home")
    factory = Factory(engine)
    people = {"erin": factory.token("erin", "author"), "alice": factory.token("alice", "approver")}
    root, port = tmp_path / "mlflow", mlflow_fixture.free_port()

    with mlflow_at(root, port, monkeypatch) as server:
        v1, run1 = mlflow_fixture.register_sklearn_model(server.url, "outage", n_estimators=3)
        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
        source = str(client.get_model_version("outage", str(v1)).source)
        # A second version of the same logged model (no training): registered while MLflow is
        # up, its intake runs once MLflow is gone.
        v2 = int(
            client.create_model_version(
                "outage", source, run_id=run1, model_id=source.removeprefix("models:/")
            ).version
        )
        client.create_registered_model("fraud")  # a second model, for the API's requests
        client.create_model_version(
            "fraud", source, run_id=run1, model_id=source.removeprefix("models:/")
        )
        factory.version("fraud", 1)
        registry = MlflowRegistry(server.url)
        first = intake(engine, registry, sink, "outage", v1)
        assert first.transition_id is not None
    # MLflow is stopped (its whole process group): the registry client keeps its address.

    with pytest.raises(RetryableError):
        intake(engine, registry, sink, "outage", v2)
    with pytest.raises(RetryableError):  # a reconcile run in the outage is retried, not failed
        reconcile(
            engine, registry, sink, DataPlane(FakeBackend(), router_url=None), stale_after_s=0
        )
    with transaction(engine, read_only=True) as s:
        assert ("outage", v2) not in versions.known_versions(s)

    # The API's webhook and transition endpoints need no MLflow.
    with TestClient(create_app(settings, engine=engine, sink=sink)) as api:
        approved = api.post(
            f"/api/v1/transitions/{first.transition_id}/approvals",
            headers=people["alice"],
            json={"decision": "approve", "comment": "ok"},
        )
        assert approved.status_code == 201, approved.text
        assert approved.json()["status"] == "approved"
        requested = api.post(
            "/api/v1/transitions",
            headers=people["erin"],
            json={"model": "fraud", "version": 1, "to_stage": "shadow", "reason": "ready"},
        )
        assert requested.status_code == 201, requested.text
        created = {"entity": "model_version", "action": "created"}
        created["data"] = {"name": "outage", "version": v2}
        raw, headers = _signed(settings, created)
        delivered = api.post("/api/v1/events/mlflow", content=raw, headers=headers)
        assert delivered.status_code == 202, delivered.text
        assert [e.event for e in sink.events][-1] == "mlflow.model_version.created"
        assert api.get("/api/health").status_code == 200

    # Applying the approved move needs the artifact's digest from MLflow: retryable, and the
    # transition stays approved for the next try.
    with pytest.raises(RetryableError):
        apply_transition(engine, registry, first.transition_id, backend="fake")
    with transaction(engine, read_only=True) as s:
        held = transitions.get_transition(s, first.transition_id)
        assert held.status is TransitionStatus.approved

    with mlflow_at(root, port, monkeypatch) as server:
        back_at = time.monotonic()
        report = reconcile(
            engine, registry, sink, DataPlane(FakeBackend(), router_url=None), stale_after_s=0
        )
        caught_up_s = time.monotonic() - back_at
        print(f"\nreconcile caught up {caught_up_s:.2f} s after MLflow was back")
        assert caught_up_s < RECOVERY_LIMIT_S
        assert report.errors == []
        assert report.intaken == [f"outage/{v2}"]
        assert report.applied == [f"{first.transition_id}: applied"]
        with transaction(engine, read_only=True) as s:
            assert versions.get_version(s, "outage", v1).stage is Stage.shadow
            assert versions.get_version(s, "outage", v2).stage is Stage.candidate
        mirrored = client.get_model_version("outage", str(v1)).tags
        assert mirrored[STAGE_TAG] == Stage.shadow.value
        # Run again: nothing is intaken or applied twice.
        again = reconcile(
            engine, registry, sink, DataPlane(FakeBackend(), router_url=None), stale_after_s=0
        )
        assert again.intaken == []
        assert again.applied == []
    engine.dispose()


# -- what the embedded MLflow exposes (docs/reliability.md, "The embedded MLflow") ------------


def test_the_embedded_mlflow_listens_on_loopback_and_the_api_checks_a_generated_secret(
    tmp_path: Path,
) -> None:
    """MLflow runs without authentication and may send webhooks to private addresses; what
    Stagegate controls is who can reach it and what our receiver accepts."""
    settings = Settings(home=tmp_path / "home")
    secrets = load_secrets(settings)
    specs = {s.name: s for s in default_specs(settings, secrets)}

    for name in ("mlflow", "api"):  # neither is reachable from another machine
        argv = specs[name].argv
        assert argv[argv.index("--host") + 1] == "127.0.0.1", (name, argv)
    # The receiver checks deliveries against the stack's own secret, not the public default.
    api_secret = specs["api"].env["STAGEGATE_WEBHOOK__SECRET"]
    assert api_secret == secrets.webhook_secret
    assert api_secret != DEV_WEBHOOK_SECRET
    # An explicitly configured secret is what both sides use instead.
    configured = Settings(home=tmp_path / "home", webhook={"secret": "x" * 40})
    api_env = {s.name: s for s in default_specs(configured, secrets)}["api"].env
    assert api_env["STAGEGATE_WEBHOOK__SECRET"] == "x" * 40


# -- the database cut in the middle of a write's transaction ---------------------------------

# What a write may touch; a cut transaction must leave every row of them as it was.
WRITTEN_TABLES = (
    "approval",
    "audit_log",
    "audit_head",
    "transition",
    "model_version",
    "deployment",
    "endpoint",
)


class BackendCutter:
    """Kills the API's (or a step's) own PostgreSQL session from inside its transaction.

    Armed with `at`, it counts the points where the engine has just run a statement or is about
    to send COMMIT, and at point `at` terminates that connection's server process from a
    superuser connection (`pg_terminate_backend`, which waits until the process is gone) before
    the caller goes on. So the cut lands, every time, between two statements of one
    transaction, or between its last statement and its COMMIT: no timing involved.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        self.admin = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        self.at: int | None = None
        self.seen = 0
        self.cut: str | None = None  # where the last armed cut landed
        event.listen(engine, "after_cursor_execute", self._after_execute)
        event.listen(engine, "commit", self._before_commit)

    @contextlib.contextmanager
    def armed(self, at: int) -> Iterator[None]:
        """Cut at point `at` of what runs inside the block (no cut if it has fewer points)."""
        self.at, self.seen, self.cut = at, 0, None
        try:
            yield
        finally:
            self.at = None

    def _after_execute(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self._point(conn, " ".join(statement.split()[:3]))

    def _before_commit(self, conn: Any) -> None:
        self._point(conn, "COMMIT")

    def _point(self, conn: Any, what: str) -> None:
        if self.at is None:
            return
        self.seen += 1
        if self.seen < self.at:
            return
        self.at = None
        pid = conn.connection.dbapi_connection.info.backend_pid
        with self.admin.connect() as admin:
            gone = admin.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
            assert gone.scalar() is True, f"backend {pid} did not end"
        self.cut = f"{self.seen}: {what}"


def _rows(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a write touches, in a stable order."""
    with engine.connect() as conn:
        return {
            table: sorted(
                (tuple(row) for row in conn.execute(text(f"SELECT * FROM {table}"))), key=repr
            )
            for table in WRITTEN_TABLES
        }


def _audit_ok(engine: Engine) -> bool:
    with transaction(engine, read_only=True) as s:
        return audit.verify(s).ok


@pytest.mark.slow
def test_a_database_cut_inside_an_approval_or_an_apply_writes_nothing_and_a_retry_lands_once(
    postgres: Postgres, tmp_path: Path
) -> None:
    """Cut the connection at every point of one approval's transaction (over HTTP) and of one
    stage apply (the step): each cut is a 503 or a RetryableError and leaves the database as it
    was; then the same request, uncut, lands once."""
    upgrade(postgres.url)
    engine = make_engine(postgres.url)
    cutter = BackendCutter(engine, postgres.url)
    factory = Factory(engine)
    people = {
        "erin": factory.token("erin", "author"),
        "alice": factory.token("alice", "approver"),
        "bob": factory.token("bob", "approver"),
    }
    factory.version("fraud", 1)
    factory.place("fraud", 1, Stage.production)  # the champion the shadow move sits beside
    factory.version("fraud", 2)
    with transaction(engine) as s:
        policy = default_policy()
        raised = [  # two approvals: the acknowledged first one must survive the cuts
            r.model_copy(update={"required": 2}) if Stage.shadow in r.to_stages else r
            for r in policy.approvals
        ]
        policies.set_policy(s, "fraud", policy.model_copy(update={"approvals": raised}), actor="t")
        pending, _ = transitions.request(
            s,
            principal=Principal("erin", Role.author),
            model="fraud",
            version=2,
            to_stage=Stage.shadow,
            reason="ready",
            now=utcnow(),
        )
    tid = pending.id
    decide_url = f"/api/v1/transitions/{tid}/approvals"
    approve = {"decision": "approve", "comment": "fine"}
    cuts: dict[str, list[str]] = {"approval": [], "apply": []}

    with (
        live_api(Settings(home=tmp_path / "home"), engine) as url,
        httpx.Client(base_url=url, timeout=10) as api,
    ):
        acked = api.post(decide_url, headers=people["alice"], json=approve)
        assert acked.status_code == 201, acked.text

        for at in range(1, 200):
            before = _rows(engine)
            started = time.monotonic()
            with cutter.armed(at):
                answer = api.post(decide_url, headers=people["bob"], json=approve)
            if cutter.cut is None:  # past the transaction's last point: nothing was cut
                break
            _assert_unavailable(answer, f"approval cut at {cutter.cut}")
            assert time.monotonic() - started < 5, cutter.cut
            assert _rows(engine) == before, f"approval cut at {cutter.cut} wrote something"
            cuts["approval"].append(cutter.cut)
        assert answer.status_code == 201, answer.text  # the retry, uncut, lands
        assert answer.json()["status"] == TransitionStatus.approved.value
        again = api.post(decide_url, headers=people["bob"], json=approve)
        assert again.status_code == 409, again.text  # and only once
        assert _approvals(engine, tid) == {"alice": 1, "bob": 1}

    registry = FakeRegistry()
    registry.add("fraud", 2)
    registry.digests[("fraud", 2)] = f"{2:064x}"  # the digest the version was recorded with
    for at in range(1, 200):
        before = _rows(engine)
        try:
            with cutter.armed(at):
                applied = apply_transition(engine, registry, tid, backend="fake")
        except RetryableError as exc:
            assert "database unavailable" in exc.detail, exc.detail
            assert _rows(engine) == before, f"apply cut at {cutter.cut} wrote something"
            cuts["apply"].append(str(cutter.cut))
            continue
        assert cutter.cut is None, f"apply cut at {cutter.cut} did not fail"
        break
    assert applied.status is TransitionStatus.applied, applied
    with transaction(engine, read_only=True) as s:
        assert versions.get_version(s, "fraud", 2).stage is Stage.shadow
        assert versions.get_version(s, "fraud", 1).stage is Stage.production
        assert endpoints.get_endpoint(s, "fraud").generation == applied_generation(s, tid)
    rerun = apply_transition(engine, registry, tid, backend="fake")  # keyed: a no-op
    assert rerun.status is TransitionStatus.applied
    assert _audit_ok(engine)
    print(
        f"\ncut {len(cuts['approval'])} points of an approval and {len(cuts['apply'])} of an "
        "apply: each a 503/RetryableError, nothing written; the uncut retry landed once"
    )
    # Every kind of point was hit: inside the writes, and just before COMMIT.
    for kind, points in cuts.items():
        assert any("INSERT" in p or "UPDATE" in p for p in points), (kind, points)
        assert any(p.endswith("COMMIT") for p in points), (kind, points)
    engine.dispose()
    cutter.admin.dispose()


def applied_generation(session: Any, tid: str) -> int:
    generation = transitions.get_transition(session, tid).generation
    assert generation is not None
    return int(generation)
