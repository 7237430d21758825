"""Authorship attestation: an authenticated identity says "I wrote this version".

The MLflow author is a name the client sends, so an approver could register a version under
a colleague's name and approve it. Under `authorship: attested` no approval of a move into a
served stage counts until someone attests, and the attester is an author of record: they may
not approve either. Writes its audit row in the caller's transaction and never commits.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session

from stagegate.errors import ConflictError, PermissionDenied
from stagegate.governance import audit, identities, transitions, versions
from stagegate.governance.models import ModelVersion, Transition
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.decisions import role_refusal
from stagegate.lifecycle.stages import Role

# People who write models: the service identity attests nothing.
ATTESTER_ROLES = frozenset({Role.author, Role.approver, Role.admin})


def attest(
    session: Session, *, principal: Principal, model: str, version: int, now: datetime
) -> tuple[ModelVersion, list[Transition]]:
    """Record `principal` as the version's attested author, bound to its current artifact,
    then re-run the gates of its pending transitions. Returns the version and those
    transitions. One attestation per artifact: the first wins, a second is a ConflictError
    (until the artifact changes, which voids it)."""
    if principal.role not in ATTESTER_ROLES:
        raise PermissionDenied(role_refusal(principal.role, ATTESTER_ROLES))
    row = versions.get_version(session, model, version, lock=True)
    if row.attested_by is not None and row.attested_digest == row.digest:
        at = f"{row.attested_at:%Y-%m-%d %H:%M} UTC" if row.attested_at else "earlier"
        raise ConflictError(
            f"{model} v{version} is attested already, by {row.attested_by} at {at}; "
            "one attestation per version"
        )
    voided = row.attested_by  # attested an artifact since replaced, or None
    row.attested_by, row.attested_at, row.attested_digest = principal.name, now, row.digest
    session.add(row)
    audit.append(
        session,
        actor=principal.name,
        action="version.attested",
        entity_type="version",
        entity_id=f"{model}/{version}",
        data={
            "digest": row.digest,
            "mlflow_user": row.creator,
            "linked_identity": identities.identity_of(session, row.creator),
            **({"replaces": voided} if voided is not None else {}),
        },
    )
    # Approvals given while the policy said `registry` may now count (or, the attester's
    # own, stop counting): the gates decide again, in this transaction.
    moved = [
        transitions.reevaluate(session, transition_id=tid, now=now, actor=principal.name)
        for tid in transitions.pending_ids(session, model=model, version=version)
    ]
    return row, moved
