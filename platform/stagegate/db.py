"""Database engine and transactions. Callers own the transaction; services never commit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.types import TypeDecorator
from sqlmodel import Session, create_engine

from stagegate.errors import RetryableError

# `Engine` is re-exported: steps and flows type with it without importing SQL libraries.
__all__ = ["Engine", "UTCDateTime", "make_engine", "reader", "transaction", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, so SQLite and PostgreSQL read back the same."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


_BUSY_TIMEOUT_S = 30
_HOLDS_WRITER = "stagegate_holds_writer"


def _sqlite_setup(engine: Engine) -> None:
    # pysqlite's own transaction handling defers BEGIN; take the write lock up front instead,
    # so concurrent writers queue on busy_timeout rather than fail mid-transaction.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    # Writers in this process queue on a lock, which hands over the moment the holder ends:
    # SQLite's own busy handler polls with sleeps of up to 100 ms, and under load those sleeps
    # were most of a write's latency. Other processes still meet SQLite's busy timeout; past
    # that timeout here, a writer goes on without the lock and meets it too.
    writer = threading.Lock()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Readers (see `reader`) begin DEFERRED: under WAL they never wait for writers.
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("BEGIN DEFERRED")
            return
        if writer.acquire(timeout=_BUSY_TIMEOUT_S):
            conn.info[_HOLDS_WRITER] = True
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            _release(conn)
            raise

    def _release(conn: Any) -> None:
        if conn.info.pop(_HOLDS_WRITER, False):
            writer.release()

    event.listen(engine, "commit", _release)
    event.listen(engine, "rollback", _release)


READ_ONLY = "stagegate_read_only"


def reader(engine: Engine) -> Engine:
    """The same engine and pool, for transactions that only read."""
    return engine.execution_options(**{READ_ONLY: True})


def make_engine(url: str, *, echo: bool = False) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False})
        _sqlite_setup(engine)
        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


@contextmanager
def transaction(engine: Engine, *, read_only: bool = False) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with Session(reader(engine) if read_only else engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            raise RetryableError(f"database unavailable: {exc.orig}") from exc
        except IntegrityError as exc:
            # A concurrent writer inserted the same key (a duplicate event, say); a retry
            # finds its row through the idempotency key instead.
            session.rollback()
            raise RetryableError(f"concurrent change: {exc.orig}", delay_s=0.5) from exc
        except BaseException:
            session.rollback()
            raise
