"""API tokens: random bearer secrets, stored only as sha256, each carrying one role.

A token may expire; the identities the platform acts under are reserved for it. The API keeps
what it verified for a few seconds (`TokenCache`), so most requests skip the token query.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, event, or_
from sqlmodel import Session, col, select

from stagegate.db import utcnow
from stagegate.errors import ConflictError, InvalidInput, NotFoundError, StagegateError
from stagegate.governance import audit
from stagegate.governance.models import ApiToken
from stagegate.lifecycle.stages import Role

PREFIX = "sg_"

# The identities the platform acts under, in approvals, transitions and the audit log: the
# steps and flows ("stagegate"), registry webhook deliveries ("mlflow-webhook") and the embedded
# router ("stagegate-router"). A person holding one of these names could pass for the platform,
# so only `ensure_token` (called by the platform itself) may issue them.
RESERVED_NAMES = frozenset({"stagegate", "mlflow-webhook", "stagegate-router"})

# A name is an identity shown in approvals and the audit log: short, printable, no spaces.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")
_DURATION = re.compile(r"(\d{1,7})([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_LIFETIME = timedelta(days=3650)  # longer is "never"; say so by leaving the expiry out


class TokenRejected(StagegateError):
    """The secret authenticates nobody; `detail` says why (unknown, revoked, expired)."""

    code = "unauthenticated"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's name is the identity recorded in approvals and audit."""

    name: str
    role: Role
    # When the token that authenticated this call expires (None: until revoked). Not part of
    # who the caller is, so two principals of one identity still compare equal.
    expires_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class TokenInfo:
    """What may be shown about a token: never its secret, nor its hash."""

    name: str
    role: Role
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    status: str  # active | expired | revoked


def hash_token(token: str) -> str:
    # Tokens are 256-bit random, so a plain sha256 is enough (no password stretching needed).
    return hashlib.sha256(token.encode()).hexdigest()


def parse_lifetime(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `2w` or `45s` as a timedelta, positive and at most ten years."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidInput(f"lifetime {text!r} is not a number and a unit (s, m, h, d, w): 30d")
    lifetime = timedelta(**{_UNITS[match[2]]: int(match[1])})
    if not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise InvalidInput(f"lifetime {text!r} must be over 0 and at most {MAX_LIFETIME.days}d")
    return lifetime


def is_reserved(name: str) -> bool:
    # Case-blind: "Stagegate" in an audit row would read as the platform to a person.
    return name.strip().casefold() in RESERVED_NAMES


def create_token(
    session: Session,
    *,
    name: str,
    role: Role,
    actor: str = "cli",
    expires_in: timedelta | None = None,
    now: datetime | None = None,
) -> str:
    """Create a token for a person or an outside service and return its secret; only its hash
    is kept. Reserved identities are refused: the platform issues those (`ensure_token`)."""
    check_name(name)
    if is_reserved(name):
        raise InvalidInput(
            f"{name!r} is reserved for the platform's own services "
            f"({', '.join(sorted(RESERVED_NAMES))}); choose another name"
        )
    created = now or utcnow()
    expires_at = None
    if expires_in is not None:
        if not timedelta(0) < expires_in <= MAX_LIFETIME:
            raise InvalidInput(f"a token lives over 0 and at most {MAX_LIFETIME.days} days")
        expires_at = created + expires_in
    _check_one_role(session, name, role, created)
    secret = PREFIX + secrets.token_urlsafe(32)
    _add(session, name=name, role=role, secret=secret, actor=actor, at=created, expires=expires_at)
    return secret


def ensure_token(session: Session, *, name: str, role: Role, secret: str, actor: str) -> bool:
    """Register a secret made elsewhere (the embedded stack's own services); idempotent.
    The platform's way in: reserved names are allowed here. Returns True when it was added."""
    if not secret.startswith(PREFIX):
        raise InvalidInput(f"a token starts with {PREFIX!r}")
    check_name(name)
    found = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(secret))).first()
    if found is not None:
        if found.revoked_at is not None or found.name != name or found.role != role:
            raise ConflictError(f"that secret is taken, or was revoked; make a new one for {name}")
        return False
    now = utcnow()
    _check_one_role(session, name, role, now)
    _add(session, name=name, role=role, secret=secret, actor=actor, at=now, expires=None)
    return True


def _add(
    session: Session,
    *,
    name: str,
    role: Role,
    secret: str,
    actor: str,
    at: datetime,
    expires: datetime | None,
) -> None:
    hashed = hash_token(secret)
    session.add(
        ApiToken(name=name, role=role, token_hash=hashed, created_at=at, expires_at=expires)
    )
    audit.append(
        session,
        actor=actor,
        action="token.created",
        entity_type="token",
        entity_id=name,
        data={"role": role.value, "expires_at": expires.isoformat() if expires else None},
    )


def check_name(name: str) -> None:
    if _NAME.fullmatch(name) is None:
        raise InvalidInput(
            f"token name {name!r} must be 1-100 letters, digits or . _ @ + -, "
            "starting with a letter or digit"
        )


def _live(now: datetime) -> ColumnElement[bool]:
    """Neither revoked nor expired."""
    return and_(
        col(ApiToken.revoked_at).is_(None),
        or_(col(ApiToken.expires_at).is_(None), col(ApiToken.expires_at) > now),
    )


def _check_one_role(session: Session, name: str, role: Role, now: datetime) -> None:
    # Expired tokens authenticate nobody, so they hold no role any more.
    existing = session.exec(select(ApiToken).where(ApiToken.name == name, _live(now))).first()
    if existing is not None and existing.role != role:
        raise ConflictError(f"{name!r} already holds role {existing.role}; one role per identity")


def revoke_token(session: Session, *, name: str, actor: str = "cli") -> int:
    """Revoke every unrevoked token of `name` (expired ones too, so the list says so);
    returns how many."""
    active = session.exec(
        select(ApiToken).where(ApiToken.name == name, col(ApiToken.revoked_at).is_(None))
    ).all()
    if not active:
        raise NotFoundError(f"no active token named {name!r}")
    for token in active:
        token.revoked_at = utcnow()
        session.add(token)
    # Once this commits, no cache in this process may answer for the old tokens.
    session.info[_REVOKED] = True
    audit.append(
        session,
        actor=actor,
        action="token.revoked",
        entity_type="token",
        entity_id=name,
        data={"count": len(active)},
    )
    return len(active)


def is_live(token: ApiToken, now: datetime) -> bool:
    return _status(token, now) == "active"


def _status(token: ApiToken, now: datetime) -> str:
    if token.revoked_at is not None:
        return "revoked"
    if token.expires_at is not None and token.expires_at <= now:
        return "expired"
    return "active"


def list_tokens(session: Session, *, now: datetime | None = None) -> list[TokenInfo]:
    """Every token, by name then age, as `TokenInfo` (no secret, no hash)."""
    at = now or utcnow()
    rows = session.exec(
        select(ApiToken).order_by(col(ApiToken.name), col(ApiToken.created_at))
    ).all()
    return [
        TokenInfo(t.name, t.role, t.created_at, t.expires_at, t.revoked_at, _status(t, at))
        for t in rows
    ]


def authenticate(session: Session, secret: str, *, now: datetime | None = None) -> Principal:
    """The principal a secret stands for; raises TokenRejected saying why it stands for nobody."""
    if not secret.startswith(PREFIX):
        raise TokenRejected("invalid token")
    token = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(secret))).first()
    if token is None:
        raise TokenRejected("invalid token")
    status = _status(token, now or utcnow())
    if status != "active":
        raise TokenRejected(f"token {status}")
    return Principal(token.name, token.role, token.expires_at)


# --- what the API verified, kept briefly ------------------------------------------------------

_REVOKED = "stagegate_token_revoked"


class _Revocations:
    """Bumped after every commit that revoked a token in this process; cache entries verified
    before the bump are void. Revocations by other processes wait out the cache's TTL."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def bump(self) -> None:
        with self._lock:
            self.count += 1


_revocations = _Revocations()


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    if session.info.pop(_REVOKED, False):
        _revocations.bump()


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop(_REVOKED, None)


class TokenCache:
    """Principals verified within the last `ttl_s` seconds, keyed by the token's sha256.

    Only live tokens are kept, so unknown, revoked and expired secrets always reach the
    database. The bounds: an expiry holds to the instant (checked on every hit); a revocation
    committed in this process holds at once; one committed elsewhere (`stagegate token revoke`,
    another API worker) holds within `ttl_s`. `ttl_s = 0` turns the cache off.
    """

    def __init__(
        self, ttl_s: float, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[Principal, float, int]] = {}
        self._lock = threading.Lock()

    def get(self, secret: str, now: datetime) -> Principal | None:
        """The cached principal, or None: the caller must `authenticate` (and `put`)."""
        if self.ttl_s <= 0:
            return None
        key = hash_token(secret)
        hit = self._entries.get(key)
        if hit is None:
            return None
        principal, verified_at, generation = hit
        if (
            generation != _revocations.count
            or self._clock() - verified_at >= self.ttl_s
            or (principal.expires_at is not None and principal.expires_at <= now)
        ):
            with self._lock:
                self._entries.pop(key, None)
            return None
        return principal

    def generation(self) -> int:
        """Read before `authenticate`: a revocation committed meanwhile voids the answer."""
        return _revocations.count

    def put(self, secret: str, principal: Principal, generation: int) -> None:
        if self.ttl_s <= 0 or generation != _revocations.count:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # only live tokens get here; a full cache just restarts
            self._entries[hash_token(secret)] = (principal, self._clock(), generation)
