"""The `stagegate` command line, run as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import text

from stagegate.api.app import create_app
from stagegate.db import make_engine
from stagegate.events.sink import MemorySink
from stagegate.settings import Settings

STAGEGATE = [sys.executable, "-m", "stagegate.cli"]


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STAGEGATE_HOME": str(home)}
    env.pop("STAGEGATE_DB__URL", None)
    return subprocess.run(
        [*STAGEGATE, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


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


def test_bad_role_is_a_clear_usage_error(tmp_path: Path) -> None:
    r = run(tmp_path, "token", "create", "--role", "god", "--name", "x")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "god" in r.stderr


def test_status_json_without_a_stack(tmp_path: Path) -> None:
    r = run(tmp_path, "status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"mlflow", "prefect", "api", "worker", "router"}
    assert not any(s["running"] for s in doc.values())
