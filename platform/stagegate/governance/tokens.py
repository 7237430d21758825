"""API tokens: random bearer secrets, stored only as sha256, each carrying one role."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlmodel import Session, col, select

from stagegate.db import utcnow
from stagegate.errors import ConflictError, InvalidInput, NotFoundError
from stagegate.governance import audit
from stagegate.governance.models import ApiToken
from stagegate.lifecycle.stages import Role

PREFIX = "sg_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name is the identity recorded in approvals and audit."""

    name: str
    role: Role


def hash_token(token: str) -> str:
    # Tokens are 256-bit random, so a plain sha256 is enough (no password stretching needed).
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, *, name: str, role: Role, actor: str = "cli") -> str:
    """Create a token and return its secret; only its hash is kept."""
    _check_one_role(session, name, role)
    secret = PREFIX + secrets.token_urlsafe(32)
    _add(session, name=name, role=role, secret=secret, actor=actor)
    return secret


def ensure_token(session: Session, *, name: str, role: Role, secret: str, actor: str) -> bool:
    """Register a secret made elsewhere (the embedded stack's own services); idempotent.
    Returns True when it was added."""
    if not secret.startswith(PREFIX):
        raise InvalidInput(f"a token starts with {PREFIX!r}")
    found = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(secret))).first()
    if found is not None:
        if found.revoked_at is not None or found.name != name or found.role != role:
            raise ConflictError(f"that secret is taken, or was revoked; make a new one for {name}")
        return False
    _check_one_role(session, name, role)
    _add(session, name=name, role=role, secret=secret, actor=actor)
    return True


def _add(session: Session, *, name: str, role: Role, secret: str, actor: str) -> None:
    session.add(ApiToken(name=name, role=role, token_hash=hash_token(secret)))
    audit.append(
        session,
        actor=actor,
        action="token.created",
        entity_type="token",
        entity_id=name,
        data={"role": role.value},
    )


def _check_one_role(session: Session, name: str, role: Role) -> None:
    existing = session.exec(
        select(ApiToken).where(ApiToken.name == name, col(ApiToken.revoked_at).is_(None))
    ).first()
    if existing is not None and existing.role != role:
        raise ConflictError(f"{name!r} already holds role {existing.role}; one role per identity")


def revoke_token(session: Session, *, name: str, actor: str = "cli") -> int:
    """Revoke every active token of `name`; returns how many."""
    active = session.exec(
        select(ApiToken).where(ApiToken.name == name, col(ApiToken.revoked_at).is_(None))
    ).all()
    if not active:
        raise NotFoundError(f"no active token named {name!r}")
    for token in active:
        token.revoked_at = utcnow()
        session.add(token)
    audit.append(
        session,
        actor=actor,
        action="token.revoked",
        entity_type="token",
        entity_id=name,
        data={"count": len(active)},
    )
    return len(active)


def authenticate(session: Session, secret: str) -> Principal | None:
    if not secret.startswith(PREFIX):
        return None
    token = session.exec(
        select(ApiToken).where(
            ApiToken.token_hash == hash_token(secret), col(ApiToken.revoked_at).is_(None)
        )
    ).first()
    return Principal(token.name, token.role) if token else None
