"""Signed checkpoints catch what the hash chain alone cannot: a truncated log, a tail rewritten
with every later hash recomputed, and a forged checkpoint. On the real governance database."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from stagegate.db import transaction
from stagegate.governance import audit
from stagegate.governance import checkpoint as cp
from stagegate.governance.models import AuditEntry


def _append(engine: Engine, n: int, start: int = 0) -> None:
    with transaction(engine) as s:
        for i in range(start, start + n):
            audit.append(
                s, actor="alice", action="test.event", entity_type="thing", entity_id=f"t{i}"
            )


def _checkpoint(engine: Engine, key: Ed25519PrivateKey) -> cp.Checkpoint:
    with transaction(engine, read_only=True) as s:
        return cp.create(s, key)


def _check(
    engine: Engine, saved: cp.Checkpoint, trusted: Ed25519PrivateKey | None = None
) -> cp.CheckResult:
    with transaction(engine, read_only=True) as s:
        return cp.check(s, saved, trusted=trusted.public_key() if trusted else None)


def _chain_alone_ok(engine: Engine) -> bool:
    with transaction(engine, read_only=True) as s:
        return audit.verify(s).ok


def _rechain(s: Session, from_seq: int) -> None:
    """What a careful attacker does after editing: recompute every hash from `from_seq` on,
    and the head, so the chain verifies again."""
    rows = s.exec(select(AuditEntry).where(col(AuditEntry.seq) >= from_seq).order_by("seq")).all()
    prev = audit.GENESIS
    if from_seq > 1:
        prev = s.exec(select(AuditEntry.hash).where(AuditEntry.seq == from_seq - 1)).one()
    for row in rows:
        row.prev_hash = prev
        row.hash = audit.entry_hash(
            prev, row.seq, row.at, row.actor, row.action, row.entity_type, row.entity_id, row.data
        )
        s.add(row)
        s.flush()
        prev = row.hash
    last = rows[-1].seq if rows else from_seq - 1
    s.execute(
        text("UPDATE audit_head SET seq = :n, hash = :h WHERE id = 1"), {"n": last, "h": prev}
    )


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_the_honest_log_verifies_and_so_do_appends_after_it(
    engine: Engine, key: Ed25519PrivateKey
) -> None:
    _append(engine, 5)
    saved = _checkpoint(engine, key)
    assert (saved.seq, saved.rows) == (5, 5)
    result = _check(engine, saved, trusted=key)
    assert result.ok, result.reason
    assert result.key_trusted

    _append(engine, 3, start=5)
    after = _check(engine, saved, trusted=key)
    assert after.ok, after.reason
    assert after.log_rows == 8
    assert "3 appended since" in after.reason


def test_a_checkpoint_of_the_empty_log_verifies(engine: Engine, key: Ed25519PrivateKey) -> None:
    saved = _checkpoint(engine, key)
    assert (saved.seq, saved.hash) == (0, audit.GENESIS)
    _append(engine, 2)
    assert _check(engine, saved, trusted=key).ok


@pytest.mark.parametrize("cut_from", [3, 5])  # before the checkpointed row, and at it
def test_a_truncated_log_is_detected_though_the_chain_verifies(
    engine: Engine, key: Ed25519PrivateKey, cut_from: int
) -> None:
    _append(engine, 5)
    saved = _checkpoint(engine, key)
    _append(engine, 2, start=5)
    with transaction(engine) as s:
        s.execute(text("DELETE FROM audit_log WHERE seq >= :n"), {"n": cut_from})
        _rechain(s, cut_from)  # moves the head back to the new last row
    assert _chain_alone_ok(engine)  # the chain alone cannot tell

    result = _check(engine, saved, trusted=key)
    assert not result.ok
    assert result.problem == "truncated"
    assert f"ends at row {cut_from - 1}" in result.reason


def test_truncation_without_fixing_the_head_is_caught_as_a_broken_chain(
    engine: Engine, key: Ed25519PrivateKey
) -> None:
    _append(engine, 5)
    saved = _checkpoint(engine, key)
    with transaction(engine) as s:
        s.execute(text("DELETE FROM audit_log WHERE seq >= 4"))
    result = _check(engine, saved, trusted=key)
    assert result.problem == "broken"


@pytest.mark.parametrize("edited", [1, 3, 5])
def test_a_rewritten_tail_is_detected_though_the_chain_verifies(
    engine: Engine, key: Ed25519PrivateKey, edited: int
) -> None:
    _append(engine, 5)
    saved = _checkpoint(engine, key)
    _append(engine, 2, start=5)
    with transaction(engine) as s:
        row = s.exec(select(AuditEntry).where(AuditEntry.seq == edited)).one()
        row.actor = "mallory"
        s.add(row)
        s.flush()
        _rechain(s, edited)
    assert _chain_alone_ok(engine)

    result = _check(engine, saved, trusted=key)
    assert not result.ok
    assert result.problem == "rewritten"
    assert "row 5 no longer has the hash" in result.reason


def test_rows_rewritten_only_after_the_checkpoint_are_not_its_business(
    engine: Engine, key: Ed25519PrivateKey
) -> None:
    """The limit, stated: a checkpoint vouches for rows up to its head, no further."""
    _append(engine, 3)
    saved = _checkpoint(engine, key)
    _append(engine, 2, start=3)
    with transaction(engine) as s:
        s.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 5"))
        _rechain(s, 5)
    assert _check(engine, saved, trusted=key).ok


def _tampered(saved: cp.Checkpoint, **changes: object) -> cp.Checkpoint:
    return cp.Checkpoint(**{**saved.__dict__, **changes})  # type: ignore[arg-type]


def test_a_checkpoint_edited_to_match_a_truncated_log_is_forged(
    engine: Engine, key: Ed25519PrivateKey
) -> None:
    _append(engine, 5)
    saved = _checkpoint(engine, key)
    with transaction(engine) as s:
        s.execute(text("DELETE FROM audit_log WHERE seq >= 4"))
        _rechain(s, 4)
        head = s.exec(select(AuditEntry.hash).where(AuditEntry.seq == 3)).one()
    # The attacker lowers the checkpoint to the new head but cannot sign it.
    edited = _tampered(saved, seq=3, rows=3, hash=head)
    for trusted in (key, None):
        result = _check(engine, edited, trusted=trusted)
        assert result.problem == "forged"
        assert "signature does not match" in result.reason


def test_a_checkpoint_re_signed_with_another_key_is_forged_against_the_trusted_key(
    engine: Engine, key: Ed25519PrivateKey
) -> None:
    _append(engine, 5)
    mallory = Ed25519PrivateKey.generate()
    forged = _checkpoint(engine, mallory)
    result = _check(engine, forged, trusted=key)
    assert result.problem == "forged"
    assert "not the trusted key" in result.reason
    # Without a trusted key the file is only whole, not proven: and the result says so.
    untrusted = _check(engine, forged)
    assert untrusted.ok
    assert not untrusted.key_trusted


def test_a_garbled_signature_is_forged(engine: Engine, key: Ed25519PrivateKey) -> None:
    _append(engine, 2)
    saved = _checkpoint(engine, key)
    assert _check(engine, _tampered(saved, signature="not base64!"), key).problem == "forged"
    assert _check(engine, _tampered(saved, signature=""), key).problem == "forged"


def test_a_broken_chain_is_never_signed(engine: Engine, key: Ed25519PrivateKey) -> None:
    _append(engine, 3)
    with transaction(engine) as s:
        s.execute(text("UPDATE audit_log SET actor = 'mallory' WHERE seq = 2"))
    with pytest.raises(cp.CheckpointError, match="broken at row 2"):
        _checkpoint(engine, key)


# -- files -----------------------------------------------------------------------------------


def test_the_checkpoint_file_round_trips(
    engine: Engine, key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    _append(engine, 2)
    saved = _checkpoint(engine, key)
    cp.write(saved, tmp_path / "out" / "head.json")
    assert cp.read(tmp_path / "out" / "head.json") == saved
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["head.json"]  # no temp left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not JSON"),
        ("[]", "not a checkpoint"),
        ('{"format": "other"}', "not a checkpoint"),
        ('{"format": "stagegate-audit-checkpoint/1", "seq": "5"}', "'seq'"),
        ('{"format": "stagegate-audit-checkpoint/1", "seq": true}', "'seq'"),
    ],
)
def test_malformed_checkpoints_are_refused_with_the_reason(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(cp.CheckpointError, match=message):
        cp.read(path)


def test_unknown_fields_and_bad_hashes_are_refused(engine: Engine, key: Ed25519PrivateKey) -> None:
    saved = json.loads(_checkpoint(engine, key).to_json())
    with pytest.raises(cp.CheckpointError, match="unknown fields"):
        cp.Checkpoint.from_json(json.dumps({**saved, "extra": 1}))
    with pytest.raises(cp.CheckpointError, match="malformed"):
        cp.Checkpoint.from_json(json.dumps({**saved, "hash": "zz"}))
    with pytest.raises(cp.CheckpointError, match="malformed"):
        cp.Checkpoint.from_json(json.dumps({**saved, "seq": -1}))


def test_keys_are_made_0600_never_overwritten_and_refused_when_open(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "audit.pem"
    made = cp.generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cp.load_public_key(cp.public_path(path)).public_bytes_raw() == (
        made.public_key().public_bytes_raw()
    )
    assert cp.load_public_key(path).public_bytes_raw() == made.public_key().public_bytes_raw()
    assert cp.load_private_key(path).public_key().public_bytes_raw() == (
        made.public_key().public_bytes_raw()
    )
    with pytest.raises(cp.CheckpointError, match="refusing to overwrite"):
        cp.generate_key(path)
    path.chmod(0o640)
    with pytest.raises(cp.CheckpointError, match="chmod 600"):
        cp.load_private_key(path)
    with pytest.raises(cp.CheckpointError, match="cannot read"):
        cp.load_private_key(tmp_path / "missing.pem")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(cp.CheckpointError, match="not a PEM key"):
        cp.load_public_key(tmp_path / "junk.pub")
