"""The tamper-evident audit log: append inside the caller's transaction, verify the chain."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from stagegate.db import utcnow
from stagegate.governance.models import AuditEntry, AuditHead

GENESIS = "0" * 64


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def entry_hash(
    prev_hash: str,
    seq: int,
    at: datetime,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str,
    data: dict[str, Any],
) -> str:
    body = canonical(
        {
            "seq": seq,
            "at": at.isoformat(),
            "actor": actor,
            "action": action,
            "entity_type": entity_type,
            "entity_id": entity_id,
            "data": data,
        }
    )
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    entity_type: str,
    entity_id: str,
    data: dict[str, Any] | None = None,
) -> AuditEntry:
    """Add one row to the chain. It commits (or not) with the caller's change."""
    # Bumping the single head row takes a row lock (PostgreSQL) or the write lock (SQLite)
    # until commit, so two writers can never chain onto the same predecessor.
    head = session.execute(
        text("UPDATE audit_head SET seq = seq + 1 WHERE id = 1 RETURNING seq, hash")
    ).one_or_none()
    if head is None:
        session.add(AuditHead(id=1, seq=1, hash=GENESIS))
        session.flush()
        seq, prev = 1, GENESIS
    else:
        seq, prev = int(head[0]), str(head[1])
    clean = json.loads(canonical(data or {}))
    at = utcnow()
    digest = entry_hash(prev, seq, at, actor, action, entity_type, entity_id, clean)
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        entity_type=entity_type,
        entity_id=entity_id,
        data=clean,
        prev_hash=prev,
        hash=digest,
    )
    session.add(entry)
    session.execute(text("UPDATE audit_head SET hash = :h WHERE id = 1"), {"h": digest})
    return entry


def entries(
    session: Session,
    *,
    action: str | None = None,
    actor: str | None = None,
    entity_type: str | None = None,
    entity_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    offset: int,
    limit: int,
) -> list[AuditEntry]:
    """Rows newest first: exact matches on the names given, and `since <= at < until`."""
    query = select(AuditEntry)
    for column, value in (
        (AuditEntry.action, action),
        (AuditEntry.actor, actor),
        (AuditEntry.entity_type, entity_type),
        (AuditEntry.entity_id, entity_id),
    ):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(col(AuditEntry.at) >= since)
    if until is not None:
        query = query.where(col(AuditEntry.at) < until)
    return list(
        session.exec(query.order_by(col(AuditEntry.seq).desc()).offset(offset).limit(limit)).all()
    )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    rows: int
    first_bad_seq: int | None = None
    reason: str | None = None
    head_hash: str = GENESIS


def _check_row(e: AuditEntry, expected_seq: int, prev: str) -> str | None:
    """Why this row breaks the chain, or None."""
    if e.seq != expected_seq:
        return f"expected row {expected_seq} but found {e.seq} (rows deleted or inserted)"
    if e.prev_hash != prev:
        return "prev_hash does not match the previous row (rows reordered, deleted or inserted)"
    recomputed = entry_hash(
        e.prev_hash, e.seq, e.at, e.actor, e.action, e.entity_type, e.entity_id, e.data
    )
    if recomputed != e.hash:
        return "row content does not match its hash (row edited)"
    return None


def _head(session: Session) -> tuple[int, str]:
    row = session.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one_or_none()
    return (int(row[0]), str(row[1])) if row else (0, GENESIS)


def verify(session: Session, batch: int = 1000) -> VerifyResult:
    """Walk the chain in order; name the first row that an edit, delete or insert broke.

    Appends may commit while we walk (PostgreSQL statements see them): when the walk runs
    out of rows we re-read the head, and walk on while it keeps moving ahead of us.
    """
    prev, rows, waited_for = GENESIS, 0, -1
    while True:
        chunk = session.exec(
            select(AuditEntry)
            .where(col(AuditEntry.seq) > rows)
            .order_by(col(AuditEntry.seq))
            .limit(batch)
        ).all()
        for e in chunk:
            if (why := _check_row(e, rows + 1, prev)) is not None:
                return VerifyResult(False, rows, e.seq, why, prev)
            prev, rows = e.hash, e.seq
        if chunk:
            continue
        head_seq, head_hash = _head(session)
        if head_seq > rows and head_seq != waited_for:
            waited_for = head_seq  # appends landed since the last read; once more
            continue
        break
    if rows > head_seq:
        return VerifyResult(
            False,
            rows,
            head_seq + 1,
            f"rows after {head_seq} were added outside the chain's head",
            prev,
        )
    if rows != head_seq or prev != head_hash:
        return VerifyResult(
            False,
            rows,
            rows + 1,
            f"chain ends at row {rows} but the head records row {head_seq} "
            "(rows removed from the end)",
            prev,
        )
    return VerifyResult(True, rows, head_hash=prev)
