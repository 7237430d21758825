"""Signed checkpoints of the audit log, kept outside the database.

The hash chain shows that a row was edited in place. It cannot show that the log was cut
short, or rewritten with every later hash recomputed: whoever can write the database can also
rewrite its head. A checkpoint is the head (the last row's seq and hash, and the row count)
signed with an Ed25519 key that is not in the database, so it can be checked against later.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import func
from sqlmodel import Session, col, select

from stagegate.db import utcnow
from stagegate.errors import StagegateError
from stagegate.governance import audit
from stagegate.governance.models import AuditEntry

FORMAT = "stagegate-audit-checkpoint/1"
_HEX64 = frozenset("0123456789abcdef")


class CheckpointError(StagegateError):
    """A key or checkpoint file that cannot be used: missing, malformed, unsafe, or forged."""

    code = "checkpoint_invalid"


# -- keys ------------------------------------------------------------------------------------


def public_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".pub")


def fingerprint(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw(key)).hexdigest()[:16]


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_key(key_path: Path) -> Ed25519PrivateKey:
    """Write a new private key (0600, never overwriting one) and its public key beside it."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Created 0600 in one step: the secret is never readable by others, even briefly.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CheckpointError(f"{key_path} exists; refusing to overwrite a signing key") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public_path(key_path).write_bytes(public_pem)
    return key


def load_private_key(key_path: Path) -> Ed25519PrivateKey:
    """The signing key; refused if others may read it (as ssh refuses such a key)."""
    try:
        mode = key_path.stat().st_mode
        data = key_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read signing key {key_path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CheckpointError(
            f"signing key {key_path} is open to other users (mode {stat.S_IMODE(mode):04o}); "
            f"chmod 600 {key_path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"{key_path} is not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key, or the public half of a PEM private key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        if b"PRIVATE KEY" in data:
            private = serialization.load_pem_private_key(data, password=None)
            if isinstance(private, Ed25519PrivateKey):
                return private.public_key()
        else:
            public = serialization.load_pem_public_key(data)
            if isinstance(public, Ed25519PublicKey):
                return public
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a PEM key: {exc}") from None
    raise CheckpointError(f"{path} is not an Ed25519 key")


# -- checkpoints -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """The signed head: rows 1..seq of the log, the last with `hash`."""

    seq: int
    hash: str
    rows: int
    created_at: str
    public_key: str  # base64 of the raw 32-byte key that signed it
    signature: str  # base64 Ed25519 signature of `payload()`

    def payload(self) -> bytes:
        body = {
            "format": FORMAT,
            "seq": self.seq,
            "hash": self.hash,
            "rows": self.rows,
            "created_at": self.created_at,
            "public_key": self.public_key,
        }
        return audit.canonical(body).encode()

    def to_json(self) -> str:
        doc = {"format": FORMAT, **self.__dict__}
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Checkpoint:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise CheckpointError(f"not a checkpoint: its format is not {FORMAT!r}")
        fields = {"seq": int, "hash": str, "rows": int, "created_at": str}
        fields |= {"public_key": str, "signature": str}
        for name, kind in fields.items():
            value = doc.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise CheckpointError(
                    f"checkpoint field {name!r} is missing or not {kind.__name__}"
                )
        if set(doc) != {"format", *fields}:
            raise CheckpointError(
                f"checkpoint has unknown fields: {sorted(set(doc) - set(fields))}"
            )
        if doc["seq"] < 0 or len(doc["hash"]) != 64 or not set(doc["hash"]) <= _HEX64:
            raise CheckpointError("checkpoint seq or hash is malformed")
        return cls(**{k: doc[k] for k in fields})

    def signer(self) -> Ed25519PublicKey:
        try:
            return Ed25519PublicKey.from_public_bytes(
                base64.b64decode(self.public_key, validate=True)
            )
        except (ValueError, binascii.Error):
            raise CheckpointError("checkpoint public_key is not a base64 Ed25519 key") from None


def create(session: Session, key: Ed25519PrivateKey, *, now: datetime | None = None) -> Checkpoint:
    """Sign the head of an intact chain; a broken chain is refused, not blessed."""
    chain = audit.verify(session)
    if not chain.ok:
        raise CheckpointError(
            f"audit chain broken at row {chain.first_bad_seq} ({chain.reason}); "
            "not signing a tampered log"
        )
    unsigned = Checkpoint(
        seq=chain.rows,
        hash=chain.head_hash,
        rows=chain.rows,  # the chain is contiguous from 1, so the count is the last seq
        created_at=(now or utcnow()).isoformat(),
        public_key=base64.b64encode(_raw(key.public_key())).decode(),
        signature="",
    )
    signature = base64.b64encode(key.sign(unsigned.payload())).decode()
    return Checkpoint(**{**unsigned.__dict__, "signature": signature})


def write(checkpoint: Checkpoint, out: Path) -> None:
    """Write whole or not at all (a crash leaves the previous checkpoint in place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(checkpoint.to_json())
    tmp.replace(out)


def read(path: Path) -> Checkpoint:
    try:
        return Checkpoint.from_json(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint {path} is not text") from None


Problem = Literal["forged", "broken", "truncated", "rewritten"]


@dataclass(frozen=True)
class CheckResult:
    """The log against a checkpoint. `key_trusted` is False when no public key was given, so
    the signature was checked with the key the checkpoint names: it proves the file is whole,
    not who wrote it."""

    ok: bool
    problem: Problem | None
    reason: str
    checkpoint_seq: int
    log_rows: int
    key_fingerprint: str
    key_trusted: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check(
    session: Session, checkpoint: Checkpoint, *, trusted: Ed25519PublicKey | None = None
) -> CheckResult:
    """Is the log a continuation of what the checkpoint signed?

    forged: the signature fails, or another key signed it. broken: the chain itself fails.
    truncated: the log ends before the checkpointed row. rewritten: the checkpointed row's
    hash differs, so a row at or before it changed (even with the chain recomputed after).
    """
    signer = checkpoint.signer()
    rows = 0
    found = _signature_problem(checkpoint, signer, trusted)
    if found is None:
        chain = audit.verify(session)
        rows = chain.rows
        if not chain.ok:
            found = ("broken", f"audit chain broken at row {chain.first_bad_seq}: {chain.reason}")
        else:
            found = _log_problem(session, checkpoint, chain.rows)
    problem, reason = found or (
        None,
        f"the log holds the {checkpoint.seq} rows the checkpoint signed"
        f" and {rows - checkpoint.seq} appended since",
    )
    return CheckResult(
        ok=problem is None,
        problem=problem,
        reason=reason,
        checkpoint_seq=checkpoint.seq,
        log_rows=rows,
        key_fingerprint=fingerprint(signer),
        key_trusted=trusted is not None,
    )


def _signature_problem(
    checkpoint: Checkpoint, signer: Ed25519PublicKey, trusted: Ed25519PublicKey | None
) -> tuple[Problem, str] | None:
    if trusted is not None and _raw(trusted) != _raw(signer):
        return (
            "forged",
            f"checkpoint signed by key {fingerprint(signer)}, not the trusted key "
            f"{fingerprint(trusted)}",
        )
    try:
        signer.verify(base64.b64decode(checkpoint.signature, validate=True), checkpoint.payload())
    except (InvalidSignature, ValueError, binascii.Error):
        return ("forged", "checkpoint signature does not match its contents")
    if checkpoint.seq == 0 and checkpoint.hash != audit.GENESIS:
        return ("forged", "a checkpoint of the empty log must carry the genesis hash")
    return None


def _log_problem(
    session: Session, checkpoint: Checkpoint, log_rows: int
) -> tuple[Problem, str] | None:
    """Given an intact chain of `log_rows` rows: does it still hold the signed head?"""
    if log_rows < checkpoint.seq:
        return (
            "truncated",
            f"the log ends at row {log_rows} but the checkpoint signed row {checkpoint.seq}: "
            f"rows {log_rows + 1}..{checkpoint.seq} (and any after) were removed",
        )
    if checkpoint.seq > 0:
        row = session.get(AuditEntry, checkpoint.seq)
        if row is None or row.hash != checkpoint.hash:
            return (
                "rewritten",
                f"row {checkpoint.seq} no longer has the hash the checkpoint signed: rows at or "
                "before it were changed and the chain recomputed",
            )
    counted = session.exec(
        select(func.count()).select_from(AuditEntry).where(col(AuditEntry.seq) <= checkpoint.seq)
    ).one()
    if counted != checkpoint.rows:
        return (
            "rewritten",
            f"{counted} rows up to row {checkpoint.seq}, but the checkpoint signed "
            f"{checkpoint.rows}",
        )
    return None
