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
    session: Session, *, entity_id: str | None, offset: int, limit: int
) -> list[AuditEntry]:
    query = select(AuditEntry)
    if entity_id is not None:
        query = query.where(AuditEntry.entity_id == entity_id)
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


def verify(session: Session, batch: int = 1000) -> VerifyResult:
    """Walk the chain in order; name the first row that an edit, delete or insert broke."""
    prev, expected_seq, rows = GENESIS, 1, 0
    last_seq = 0
    while True:
        chunk = session.exec(
            select(AuditEntry)
            .where(col(AuditEntry.seq) > last_seq)
            .order_by(col(AuditEntry.seq))
            .limit(batch)
        ).all()
        if not chunk:
            break
        for e in chunk:
            if e.seq != expected_seq:
                return VerifyResult(
                    False,
                    rows,
                    e.seq,
                    f"expected row {expected_seq} but found {e.seq} (rows deleted or inserted)",
                    prev,
                )
            if e.prev_hash != prev:
                return VerifyResult(
                    False,
                    rows,
                    e.seq,
                    "prev_hash does not match the previous row "
                    "(rows reordered, deleted or inserted)",
                    prev,
                )
            recomputed = entry_hash(
                e.prev_hash, e.seq, e.at, e.actor, e.action, e.entity_type, e.entity_id, e.data
            )
            if recomputed != e.hash:
                return VerifyResult(
                    False, rows, e.seq, "row content does not match its hash (row edited)", prev
                )
            prev, expected_seq, rows, last_seq = e.hash, e.seq + 1, rows + 1, e.seq
    head = session.get(AuditHead, 1)
    head_seq, head_hash = (head.seq, head.hash) if head else (0, GENESIS)
    if head_seq != rows or head_hash != prev:
        return VerifyResult(
            False,
            rows,
            rows + 1 if head_seq > rows else head_seq,
            f"chain ends at row {rows} but the head records row {head_seq} "
            "(rows removed from the end)",
            prev,
        )
    return VerifyResult(True, rows, head_hash=prev)
