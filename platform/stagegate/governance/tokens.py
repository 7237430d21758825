"""API tokens: random bearer secrets, stored only as sha256, each carrying one role."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlmodel import Session, col, select

from stagegate.db import utcnow
from stagegate.errors import ConflictError, NotFoundError
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
    if session.exec(select(ApiToken).where(ApiToken.name == name)).first():
        raise ConflictError(f"a token named {name!r} already exists")
    secret = PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, role=role, token_hash=hash_token(secret))
    session.add(token)
    audit.append(
        session,
        actor=actor,
        action="token.created",
        entity_type="token",
        entity_id=name,
        data={"role": role.value},
    )
    return secret


def revoke_token(session: Session, *, name: str, actor: str = "cli") -> None:
    token = session.exec(
        select(ApiToken).where(ApiToken.name == name, col(ApiToken.revoked_at).is_(None))
    ).first()
    if token is None:
        raise NotFoundError(f"no active token named {name!r}")
    token.revoked_at = utcnow()
    session.add(token)
    audit.append(
        session, actor=actor, action="token.revoked", entity_type="token", entity_id=name, data={}
    )


def authenticate(session: Session, secret: str) -> Principal | None:
    if not secret.startswith(PREFIX):
        return None
    token = session.exec(
        select(ApiToken).where(
            ApiToken.token_hash == hash_token(secret), col(ApiToken.revoked_at).is_(None)
        )
    ).first()
    return Principal(token.name, token.role) if token else None
