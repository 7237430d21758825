"""The `stagegate` command line, run as a real process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import typer
from click.testing import Result
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from stagegate.api.app import create_app
from stagegate.cli import app
from stagegate.db import make_engine
from stagegate.events.sink import MemorySink
from stagegate.settings import Settings, get_settings

STAGEGATE = [sys.executable, "-m", "stagegate.cli"]


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STAGEGATE_HOME": str(home)}
    env.pop("STAGEGATE_DB__URL", None)
    return subprocess.run(
        [*STAGEGATE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_token_create_prints_a_working_token_and_audit_verify_catches_tampering(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    created = run(home, "token", "create", "--role", "approver", "--name", "alice")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("sg_")

    settings = Settings(home=home)
    engine = make_engine(settings.database_url)
    app = create_app(settings, engine=engine, sink=MemorySink())
    with TestClient(app) as client:
        r = client.get("/api/v1/models", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200
    with engine.connect() as conn:  # only the hash is stored
        stored = conn.execute(text("SELECT token_hash FROM api_token")).scalar_one()
        assert secret not in stored

    ok = run(home, "audit", "verify", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True

    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 1"))
    engine.dispose()
    broken = run(home, "audit", "verify")
    assert broken.returncode == 1
    assert "broken at row 1" in broken.stdout


@pytest.mark.slow
def test_bad_role_is_a_clear_usage_error(tmp_path: Path) -> None:
    r = run(tmp_path, "token", "create", "--role", "god", "--name", "x")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "god" in r.stderr


@pytest.mark.slow
def test_status_json_without_a_stack(tmp_path: Path) -> None:
    r = run(tmp_path, "status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"mlflow", "prefect", "api", "worker", "router"}
    assert not any(s["running"] for s in doc.values())


# -- in process (Typer's runner): the token and audit commands, no subprocess ---------------


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., Result]:
    """Invoke `stagegate ...` in this process against a fresh home (SQLite)."""
    runner = CliRunner()
    env = {"STAGEGATE_HOME": str(tmp_path / "home"), "STAGEGATE_DB__URL": None}

    def invoke(*args: str) -> Result:
        get_settings.cache_clear()  # built once per process; each call here reads `env`
        try:
            return runner.invoke(app, list(args), env=env)
        finally:
            get_settings.cache_clear()

    return invoke


def _home_engine(tmp_path: Path) -> Engine:
    return make_engine(Settings(home=tmp_path / "home").database_url)


def test_token_create_with_an_expiry_and_token_list(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    alice = cli("token", "create", "alice", "--role", "approver", "--expires-in", "30d")
    assert alice.exit_code == 0, alice.output
    bob = cli("token", "create", "--name", "bob", "--role", "viewer")  # the older spelling
    assert bob.exit_code == 0, bob.output
    assert cli("token", "revoke", "bob").exit_code == 0
    secrets = [alice.stdout.strip(), bob.stdout.strip()]

    listed = cli("token", "list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["role"], r["status"]) for r in rows] == [
        ("alice", "approver", "active"),
        ("bob", "viewer", "revoked"),
    ]
    lifetime = datetime.fromisoformat(rows[0]["expires_at"]) - datetime.fromisoformat(
        rows[0]["created_at"]
    )
    assert lifetime == timedelta(days=30)
    assert rows[1]["expires_at"] is None
    assert set(rows[0]) == {"name", "role", "created_at", "expires_at", "revoked_at", "status"}

    table = cli("token", "list")
    assert table.exit_code == 0, table.output
    assert "alice" in table.stdout
    assert "revoked" in table.stdout
    engine = _home_engine(tmp_path)
    with engine.connect() as conn:
        hashes = conn.execute(text("SELECT token_hash FROM api_token")).scalars().all()
    engine.dispose()
    for shown in (listed.stdout, table.stdout):
        for secret in secrets:
            assert secret not in shown
        for digest in hashes:
            assert digest not in shown
            assert digest[:12] not in shown


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("stagegate", "--role", "service"), 1, "reserved for the platform"),
        (("mlflow-webhook", "--role", "service"), 1, "reserved for the platform"),
        (("stagegate-router", "--role", "service"), 1, "reserved for the platform"),
        (("x", "--role", "viewer", "--expires-in", "soon"), 2, "lifetime 'soon'"),
        (("x", "--role", "viewer", "--expires-in", "0d"), 2, "must be over 0"),
        (("--role", "viewer"), 2, "name the identity"),
        (("x", "--name", "y", "--role", "viewer"), 2, "two names"),
    ],
)
def test_token_create_refusals_are_clear(
    cli: Callable[..., Result], args: tuple[str, ...], code: int, message: str
) -> None:
    r = cli("token", "create", *args)
    assert r.exit_code == code, r.output
    assert message in " ".join(r.stderr.split())  # rich may wrap the line
    assert r.stdout == ""
    assert "Traceback" not in r.output


def test_audit_checkpoint_then_verify_catches_truncation_and_forgery(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    for name in ("alice", "bob", "carol"):
        made_token = cli("token", "create", name, "--role", "viewer")
        assert made_token.exit_code == 0, made_token.output
    key, out = tmp_path / "keys" / "audit.pem", tmp_path / "head.json"
    made = cli("audit", "checkpoint", "--key", str(key), "--out", str(out))
    assert made.exit_code == 0, made.output
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    pub = str(key) + ".pub"
    assert json.loads(out.read_text())["seq"] == 3

    ok = cli("audit", "verify", "--checkpoint", str(out), "--pubkey", pub, "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["checkpoint"]["key_trusted"] is True
    untrusted = cli("audit", "verify", "--checkpoint", str(out))
    assert untrusted.exit_code == 0, untrusted.output
    assert "pass --pubkey" in " ".join(untrusted.stdout.split())

    # Truncate to row 2 and move the head back: the chain alone still verifies.
    engine = _home_engine(tmp_path)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log WHERE seq = 3"))
        head = conn.execute(text("SELECT hash FROM audit_log WHERE seq = 2")).scalar_one()
        conn.execute(text("UPDATE audit_head SET seq = 2, hash = :h"), {"h": head})
    engine.dispose()
    assert cli("audit", "verify").exit_code == 0
    cut = cli("audit", "verify", "--checkpoint", str(out), "--pubkey", pub)
    assert cut.exit_code == 1
    assert "truncated" in cut.stdout
    assert "ends at row 2" in " ".join(cut.stdout.split())

    # ... and lowering the checkpoint to match breaks its signature.
    doc = json.loads(out.read_text())
    out.write_text(json.dumps({**doc, "seq": 2, "rows": 2, "hash": head}))
    forged = cli("audit", "verify", "--checkpoint", str(out), "--pubkey", pub, "--json")
    assert forged.exit_code == 3
    assert json.loads(forged.stdout)["checkpoint"]["problem"] == "forged"

    out.write_text("{")
    unreadable = cli("audit", "verify", "--checkpoint", str(out))
    assert unreadable.exit_code == 3
    assert "not JSON" in unreadable.stderr


def test_audit_keygen_and_usage_errors(cli: Callable[..., Result], tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    assert cli("audit", "keygen", "--key", str(key)).exit_code == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "k.pem.pub").exists()
    again = cli("audit", "keygen", "--key", str(key))
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.stderr
    lonely = cli("audit", "verify", "--pubkey", str(tmp_path / "k.pem.pub"))
    assert lonely.exit_code == 2
    assert "--checkpoint" in lonely.stderr
    key.chmod(0o644)
    exposed = cli("audit", "checkpoint", "--key", str(key), "--out", str(tmp_path / "c.json"))
    assert exposed.exit_code == 1
    assert "chmod 600" in exposed.stderr
    assert not (tmp_path / "c.json").exists()


def test_drift_check_runs_the_flows_step_now_and_says_what_drifted(
    cli: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stagegate drift check` in process: the real database and inference log of the home,
    the registry faked at its protocol (the reference it returns is the training frame)."""
    import orjson

    from stagegate import runtime
    from stagegate.db import transaction, utcnow
    from stagegate.governance.policies import get_policy, set_policy
    from stagegate.lifecycle.stages import Stage
    from stagegate.migrate import upgrade
    from stagegate.serving.inference_log.records import InferenceRecord
    from stagegate.serving.inference_log.writer import LocalInferenceLog
    from tests.factories import Factory
    from tests.fakes import FakeRegistry
    from tests.test_drift_step import frame

    settings = Settings(home=tmp_path / "home")
    settings.home.mkdir(parents=True)
    upgrade(settings.database_url)
    engine = _home_engine(tmp_path)
    factory = Factory(engine)
    factory.version("fraud", 2)
    factory.place("fraud", 2, Stage.production)
    with transaction(engine) as s:
        policy = get_policy(s, "fraud")
        drift = policy.drift.model_copy(update={"min_rows": 100, "html_report": False})
        drift = drift.model_copy(
            update={"actions": drift.actions.model_copy(update={"emit_event": False})}
        )
        set_policy(s, "fraud", policy.model_copy(update={"drift": drift}), actor="test")
    engine.dispose()
    registry = FakeRegistry()
    registry.add("fraud", 2)
    registry.references[("fraud", 2)] = frame(1)
    monkeypatch.setattr(runtime.Runtime, "registry", property(lambda _self: registry))
    runtime.current.cache_clear()

    log = LocalInferenceLog(settings.inference_log_url)
    drifted = frame(2, shift=30, new_category=True).to_pylist()
    for i, row in enumerate(drifted):
        body = {"dataframe_records": [row]}
        log.append(
            InferenceRecord(
                f"r{i}",
                "fraud",
                2,
                "champion",
                None,
                body,
                [0],
                200,
                1.0,
                utcnow() - timedelta(seconds=30),
                orjson.dumps(body),
                "application/json",
            )
        )
    log.close()
    try:
        result = cli("drift", "check", "fraud")
        again = cli("drift", "check", "fraud", "--version", "2", "--json")
    finally:
        runtime.current.cache_clear()
    assert result.exit_code == 3, result.output  # drift
    assert "fraud v2: drift - drift in 2 of 3 columns (amount, channel)" in result.output
    assert "drifted features: amount, channel" in result.output
    assert "event: " not in result.output  # the policy said no event
    [outcome] = json.loads(again.output)
    assert outcome["verdict"] == "drift"
    assert outcome["alarm_id"]
    assert cli("drift", "check", "nobody").exit_code == 1


def test_demo_fresh_forgets_the_embedded_home_and_nothing_else(tmp_path: Path) -> None:
    from stagegate.cli import _forget_embedded_state

    home = tmp_path / "home"
    (home / "mlflow").mkdir(parents=True)
    (home / "governance.db").write_text("a previous demo's state")
    _forget_embedded_state(Settings(home=home))
    assert not home.exists()
    assert tmp_path.exists()  # only the home goes

    (home / "mlflow").mkdir(parents=True)
    server_db = {"url": "postgresql+psycopg://db.example/stagegate"}
    for refused in (
        Settings(home=home, db=server_db),
        Settings(home=home, mode="prod", db=server_db, webhook={"secret": "s" * 32}),
    ):
        with pytest.raises(typer.Exit):
            _forget_embedded_state(refused)
        assert (home / "mlflow").is_dir()  # refused: nothing deleted


def test_demo_is_a_command_with_fresh() -> None:
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0, result.output
    assert "--fresh" in result.output
