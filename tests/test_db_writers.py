"""SQLite writers in one process queue on a lock, not on SQLite's sleeping busy handler."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from stagegate.db import make_engine, transaction
from stagegate.migrate import upgrade


def test_a_second_writer_waits_for_the_first_without_the_busy_handler(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'writers.db'}"
    upgrade(url)
    engine = make_engine(url)

    # With SQLite's busy timeout at 0, a writer that met the file's lock would fail at once
    # ("database is locked"): the second writer gets through only by waiting on the lock.
    @event.listens_for(engine, "connect")
    def _no_busy_wait(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA busy_timeout=0")

    first_in, order, failures = threading.Event(), [], []

    def first() -> None:
        with transaction(engine) as s:
            s.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
            first_in.set()
            time.sleep(0.3)
            order.append("first commits")

    def second() -> None:
        first_in.wait(5)
        try:
            with transaction(engine) as s:
                s.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
                order.append("second writes")
        except Exception as exc:  # the assertion below names it
            failures.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    engine.dispose()
    assert failures == []
    assert order == ["first commits", "second writes"]


def test_readers_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'readers.db'}"
    upgrade(url)
    engine = make_engine(url)
    with transaction(engine) as writing:
        writing.execute(text("UPDATE audit_head SET seq = seq WHERE id = 1"))
        started = time.monotonic()
        with transaction(engine, read_only=True) as reading:
            reading.execute(text("SELECT seq FROM audit_head")).all()
        assert time.monotonic() - started < 1.0
    engine.dispose()
