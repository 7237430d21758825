"""The audit chain detects edits, deletions, reordering and insertions."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from stagegate.db import transaction
from stagegate.governance import audit


def _fill(engine: Engine, n: int = 5) -> None:
    with transaction(engine) as s:
        for i in range(n):
            audit.append(
                s,
                actor="alice",
                action="test.event",
                entity_type="thing",
                entity_id=f"t{i}",
                data={"i": i, "nested": {"x": [1, 2.5, "z"]}},
            )


def _verify(engine: Engine) -> audit.VerifyResult:
    with transaction(engine) as s:
        return audit.verify(s)


def test_intact_chain_verifies(engine: Engine) -> None:
    _fill(engine)
    result = _verify(engine)
    assert result.ok
    assert result.rows == 5


def test_empty_chain_verifies(engine: Engine) -> None:
    assert _verify(engine).ok


def _edit(conn) -> None:  # type: ignore[no-untyped-def]
    conn.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 3"))


def _delete(conn) -> None:  # type: ignore[no-untyped-def]
    conn.execute(text("DELETE FROM audit_log WHERE seq = 3"))


def _reorder(conn) -> None:  # type: ignore[no-untyped-def]
    # Swap rows 2 and 3 wholesale (seq stays in order, contents swap places).
    conn.execute(text("UPDATE audit_log SET seq = -2 WHERE seq = 2"))
    conn.execute(text("UPDATE audit_log SET seq = 2 WHERE seq = 3"))
    conn.execute(text("UPDATE audit_log SET seq = 3 WHERE seq = -2"))


def _insert(conn) -> None:  # type: ignore[no-untyped-def]
    # A forged row slipped in between 3 and 4, chained onto 3 with a valid-looking hash.
    row = conn.execute(text("SELECT hash FROM audit_log WHERE seq = 3")).one()
    conn.execute(text("UPDATE audit_log SET seq = seq + 100 WHERE seq > 3"))
    conn.execute(text("UPDATE audit_log SET seq = seq - 99 WHERE seq > 100"))
    from datetime import UTC, datetime

    at = datetime(2026, 1, 1, tzinfo=UTC)
    forged = audit.entry_hash(row[0], 4, at, "mallory", "x", "y", "z", {})
    conn.execute(
        text(
            "INSERT INTO audit_log (seq, at, actor, action, entity_type, entity_id, data, "
            "prev_hash, hash) VALUES (4, :at, 'mallory', 'x', 'y', 'z', '{}', :p, :h)"
        ),
        {"at": at.replace(tzinfo=None), "p": row[0], "h": forged},
    )
    conn.execute(text("UPDATE audit_head SET seq = seq + 1"))


def _truncate_tail(conn) -> None:  # type: ignore[no-untyped-def]
    conn.execute(text("DELETE FROM audit_log WHERE seq = 5"))


def _append_outside(conn) -> None:  # type: ignore[no-untyped-def]
    # A row chained correctly onto the last one, but written without moving the head.
    from datetime import UTC, datetime

    last = conn.execute(text("SELECT hash FROM audit_log WHERE seq = 5")).one()
    at = datetime(2026, 1, 1, tzinfo=UTC)
    h = audit.entry_hash(last[0], 6, at, "mallory", "x", "y", "z", {})
    conn.execute(
        text(
            "INSERT INTO audit_log (seq, at, actor, action, entity_type, entity_id, data, "
            "prev_hash, hash) VALUES (6, :at, 'mallory', 'x', 'y', 'z', '{}', :p, :h)"
        ),
        {"at": at.replace(tzinfo=None), "p": last[0], "h": h},
    )


def _edit_data(conn) -> None:  # type: ignore[no-untyped-def]
    conn.execute(text("UPDATE audit_log SET data = :d WHERE seq = 2"), {"d": '{"i": 99}'})


@pytest.mark.parametrize(
    ("tamper", "first_bad", "word"),
    [
        (_edit, 3, "edited"),
        (_edit_data, 2, "edited"),
        (_delete, 4, "deleted"),
        (_reorder, 2, "prev_hash"),
        (_insert, 5, "prev_hash"),
        (_truncate_tail, 5, "removed from the end"),
        (_append_outside, 6, "outside the chain's head"),
    ],
)
def test_tampering_is_detected_at_the_first_bad_row(
    engine: Engine, tamper: Callable[..., None], first_bad: int, word: str
) -> None:
    _fill(engine)
    with engine.begin() as conn:
        tamper(conn)
    result = _verify(engine)
    assert not result.ok
    assert result.first_bad_seq == first_bad
    assert word in (result.reason or "")


def test_appends_after_verification_keep_the_chain(engine: Engine) -> None:
    _fill(engine, 2)
    _fill(engine, 2)
    assert _verify(engine).rows == 4


def test_a_rolled_back_change_leaves_no_audit_row(engine: Engine) -> None:
    class Boom(Exception):
        pass

    def change_then_fail() -> None:
        with transaction(engine) as s:
            audit.append(s, actor="a", action="b", entity_type="c", entity_id="d")
            raise Boom

    with pytest.raises(Boom):
        change_then_fail()
    result = _verify(engine)
    assert result.ok
    assert result.rows == 0


def test_concurrent_writers_never_fork_the_chain(engine: Engine) -> None:
    """The head-row lock serialises appenders on SQLite and PostgreSQL alike."""
    from concurrent.futures import ThreadPoolExecutor

    def writer(n: int) -> None:
        for i in range(10):
            with transaction(engine) as s:
                audit.append(
                    s,
                    actor=f"w{n}",
                    action="test.concurrent",
                    entity_type="t",
                    entity_id=f"{n}-{i}",
                    data={"i": i},
                )

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(writer, range(6)))
    result = _verify(engine)
    assert result.ok, result
    assert result.rows == 60
