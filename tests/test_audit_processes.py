"""The audit chain under several API processes (`api.workers` > 1): appends from two processes
at once still form one verifiable chain, because the database orders them (the head row's lock
on PostgreSQL, the write lock on SQLite), not anything inside a process."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from stagegate.db import transaction
from stagegate.governance import audit
from stagegate.governance.models import AuditEntry

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
APPENDS = 150

# Each process waits for the go file, then appends one row per transaction, as API requests do.
_APPENDER = """
import sys, time
from pathlib import Path
from stagegate.db import make_engine, transaction
from stagegate.governance import audit

url, actor, go, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
engine = make_engine(url)
while not go.exists():
    time.sleep(0.005)
for i in range(n):
    with transaction(engine) as s:
        audit.append(s, actor=actor, action="test.append", entity_type="thing",
                     entity_id=f"{actor}-{i}", data={"i": i})
    time.sleep(0.001)  # as requests arrive apart: the other process gets its turn at the lock
engine.dispose()
"""


def test_two_processes_appending_at_once_keep_one_verifiable_chain(
    engine: Engine, tmp_path: Path
) -> None:
    url = engine.url.render_as_string(hide_password=False)
    go = tmp_path / "go"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT / "platform"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _APPENDER, url, actor, str(go), str(APPENDS)],
            env=env,
            stderr=subprocess.PIPE,
        )
        for actor in ("w1", "w2")
    ]
    time.sleep(1.0)  # both import and connect before the start, so they overlap
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()

    with transaction(engine, read_only=True) as s:
        result = audit.verify(s)
        actors = list(s.exec(select(AuditEntry.actor).order_by(col(AuditEntry.seq))).all())
    assert result.ok, result.reason
    assert result.rows == 2 * APPENDS
    assert actors.count("w1") == actors.count("w2") == APPENDS
    # The two really ran at once: one's rows fall between the other's (one switch would be
    # one block after the other).
    switches = sum(1 for a, b in itertools.pairwise(actors) if a != b)
    assert switches >= 2, f"the appenders did not overlap ({switches} switch)"
