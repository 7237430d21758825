"""Gate policies per model, falling back to the `*` row, then the built-in default."""

from __future__ import annotations

from sqlmodel import Session

from stagegate.db import utcnow
from stagegate.governance import audit
from stagegate.governance.models import PolicyRecord
from stagegate.lifecycle.policy import Policy, default_policy

DEFAULT_KEY = "*"


def get_policy(session: Session, model_name: str) -> Policy:
    for key in (model_name, DEFAULT_KEY):
        row = session.get(PolicyRecord, key)
        if row is not None:
            return Policy.model_validate(row.body)
    return default_policy()


def set_policy(session: Session, model_name: str, policy: Policy, *, actor: str) -> PolicyRecord:
    body = policy.model_dump(mode="json")
    row = session.get(PolicyRecord, model_name)
    if row is None:
        row = PolicyRecord(model_name=model_name, body=body, updated_by=actor)
    else:
        row.body, row.updated_by, row.updated_at = body, actor, utcnow()
    session.add(row)
    audit.append(
        session,
        actor=actor,
        action="policy.set",
        entity_type="policy",
        entity_id=model_name,
        data=body,
    )
    # The traffic section is part of each endpoint's desired state: keep them in step.
    from stagegate.governance import endpoints  # it reads policies: import here, not above

    endpoints.policy_changed(session, model_name, actor=actor)
    return row
