"""Identities (the names tokens carry) and the MLflow user names an admin links to them.

Separation of duties maps a version's MLflow author to an identity through these links, so
who wrote a version is decided by an admin's link, not by a name alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlmodel import Session, col, select

from stagegate.db import utcnow
from stagegate.errors import ConflictError, InvalidInput, NotFoundError
from stagegate.governance import audit
from stagegate.governance.models import ApiToken, IdentityLink, ModelVersion
from stagegate.governance.tokens import check_name, is_live, is_reserved
from stagegate.lifecycle.gates import AuthorFacts
from stagegate.lifecycle.policy import Authorship, Policy, UnmappedAuthor
from stagegate.lifecycle.stages import Role

# An MLflow user name as MLflow records it (a login, an e-mail, DOMAIN\\user), printable and
# without spaces or slashes so it fits a URL path segment and reads unambiguously in audit rows.
_MLFLOW_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\\-]{0,199}")


@dataclass(frozen=True)
class IdentityInfo:
    """An identity: its role (of a live token, else of its newest), whether a live token
    authenticates it, and the MLflow user names linked to it."""

    name: str
    role: Role
    active: bool
    mlflow_users: list[str]


def check_mlflow_user(name: str) -> None:
    if _MLFLOW_USER.fullmatch(name) is None:
        raise InvalidInput(
            f"MLflow user name {name!r} must be 1-200 letters, digits or . _ @ + - \\, "
            "starting with a letter or digit"
        )


def _tokens_of(session: Session, identity: str) -> list[ApiToken]:
    return list(
        session.exec(
            select(ApiToken)
            .where(ApiToken.name == identity)
            .order_by(col(ApiToken.created_at).desc())
        ).all()
    )


def link(session: Session, *, identity: str, mlflow_user: str, actor: str) -> bool:
    """Link an MLflow user name to an identity that holds (or held) a token. Idempotent:
    returns False, and writes nothing, when the link exists. One identity per MLflow name."""
    check_name(identity)
    check_mlflow_user(mlflow_user)
    if is_reserved(identity):
        raise InvalidInput(f"{identity!r} is the platform's own identity; link people only")
    if not _tokens_of(session, identity):
        raise NotFoundError(f"no identity {identity!r}: create a token for it first")
    existing = session.get(IdentityLink, mlflow_user, with_for_update=True)
    if existing is not None:
        if existing.identity == identity:
            return False
        raise ConflictError(
            f"MLflow user {mlflow_user!r} is linked to {existing.identity!r}; unlink it first"
        )
    session.add(IdentityLink(mlflow_user=mlflow_user, identity=identity, linked_by=actor))
    audit.append(
        session,
        actor=actor,
        action="identity.linked",
        entity_type="identity",
        entity_id=identity,
        data={"mlflow_user": mlflow_user},
    )
    return True


def unlink(session: Session, *, identity: str, mlflow_user: str, actor: str) -> None:
    """Remove the link; versions by that MLflow user are then unmapped (see the policy)."""
    existing = session.get(IdentityLink, mlflow_user, with_for_update=True)
    if existing is None or existing.identity != identity:
        raise NotFoundError(f"MLflow user {mlflow_user!r} is not linked to {identity!r}")
    session.delete(existing)
    audit.append(
        session,
        actor=actor,
        action="identity.unlinked",
        entity_type="identity",
        entity_id=identity,
        data={"mlflow_user": mlflow_user},
    )


def identity_of(session: Session, mlflow_user: str | None) -> str | None:
    """The identity an MLflow user name is linked to, or None."""
    if not mlflow_user:
        return None
    row = session.get(IdentityLink, mlflow_user)
    return row.identity if row is not None else None


def identities_of(session: Session, mlflow_users: set[str]) -> dict[str, str]:
    """MLflow user name -> linked identity, for those that are linked, in one query."""
    if not mlflow_users:
        return {}
    rows = session.exec(
        select(IdentityLink).where(col(IdentityLink.mlflow_user).in_(sorted(mlflow_users)))
    ).all()
    return {r.mlflow_user: r.identity for r in rows}


def get_identity(session: Session, name: str, *, now: datetime | None = None) -> IdentityInfo:
    tokens = _tokens_of(session, name)
    if not tokens:
        raise NotFoundError(f"no identity {name!r}")
    at = now or utcnow()
    live = [t for t in tokens if is_live(t, at)]
    return IdentityInfo(name, (live or tokens)[0].role, bool(live), linked_users(session, name))


def linked_users(session: Session, identity: str) -> list[str]:
    """The MLflow user names linked to the identity, sorted."""
    return list(
        session.exec(
            select(IdentityLink.mlflow_user)
            .where(IdentityLink.identity == identity)
            .order_by(col(IdentityLink.mlflow_user))
        ).all()
    )


def list_identities(session: Session, *, now: datetime | None = None) -> list[IdentityInfo]:
    """Every identity that holds or held a token, by name, with its linked MLflow names."""
    names = session.exec(select(ApiToken.name).distinct().order_by(col(ApiToken.name))).all()
    return [get_identity(session, n, now=now) for n in names]


def _prod() -> bool:
    from stagegate.settings import get_settings  # lazily: settings are built on first use

    return get_settings().mode == "prod"


def unmapped_default() -> UnmappedAuthor:
    """What a policy that says nothing does with an unmapped author: block in prod mode."""
    return "block" if _prod() else "warn"


def unmapped_handling(policy: Policy) -> UnmappedAuthor:
    return policy.unmapped_author or unmapped_default()


def authorship_default() -> Authorship:
    """Who a policy that says nothing takes for the author: an attested identity in prod mode,
    the registry's name in dev mode (a development stack works before anyone attests)."""
    return "attested" if _prod() else "registry"


def authorship_handling(policy: Policy) -> Authorship:
    return policy.authorship or authorship_default()


class Authored(Protocol):
    """What `author_of` reads of a version: a `ModelVersion`, or a row of just these columns."""

    @property
    def creator(self) -> str | None: ...
    @property
    def digest(self) -> str | None: ...
    @property
    def attested_by(self) -> str | None: ...
    @property
    def attested_digest(self) -> str | None: ...


def author_of(version: Authored, identity: str | None, policy: Policy) -> AuthorFacts:
    """The version's authors, given the identity its MLflow author is linked to."""
    return AuthorFacts(
        mlflow_user=version.creator,
        identity=identity,
        unmapped=unmapped_handling(policy),
        authorship=authorship_handling(policy),
        attester=version.attested_by,
        # Bound to the artifact: a changed digest voids it, as it voids approvals.
        attested=version.attested_by is not None and version.attested_digest == version.digest,
    )


def author_facts(session: Session, version: ModelVersion, policy: Policy) -> AuthorFacts:
    """The version's MLflow author, the identity linked to it, its attester, and the policy's
    handling of each."""
    return author_of(version, identity_of(session, version.creator), policy)
