"""Gate policies per model, falling back to the `*` row, then the built-in default.

A change that weakens a policy (fewer approvals than the floor, other approver roles, an
unmapped author let through, authorship no longer attested, a rollback without approval)
waits for a second admin: four eyes, as for stage moves. Every change, applied or not, is a
`PolicyChange` row and audited.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlmodel import Session, col, select

from stagegate.db import utcnow
from stagegate.errors import ConflictError, NotFoundError, PermissionDenied
from stagegate.governance import audit
from stagegate.governance.identities import authorship_handling, unmapped_handling
from stagegate.governance.models import PolicyChange, PolicyChangeStatus, PolicyRecord
from stagegate.lifecycle.policy import Policy, default_policy
from stagegate.lifecycle.stages import ALLOWED_MOVES

DEFAULT_KEY = "*"


def get_policy(session: Session, model_name: str) -> Policy:
    for key in (model_name, DEFAULT_KEY):
        row = session.get(PolicyRecord, key)
        if row is not None:
            return Policy.model_validate(row.body)
    return default_policy()


def policies_for(session: Session, model_names: set[str]) -> dict[str, Policy]:
    """`get_policy` for many models in one query: each its own row, else the default."""
    rows = {
        r.model_name: r
        for r in session.exec(
            select(PolicyRecord).where(
                col(PolicyRecord.model_name).in_([*model_names, DEFAULT_KEY])
            )
        ).all()
    }
    default = rows.get(DEFAULT_KEY)
    fallback = Policy.model_validate(default.body) if default is not None else default_policy()
    return {
        name: Policy.model_validate(rows[name].body) if name in rows else fallback
        for name in model_names
    }


def _effective(session: Session, key: str) -> Policy:
    """What `key` is governed by now: for `*`, its row or the built-in default."""
    if key == DEFAULT_KEY:
        row = session.get(PolicyRecord, DEFAULT_KEY)
        return Policy.model_validate(row.body) if row is not None else default_policy()
    return get_policy(session, key)


def set_policy(session: Session, model_name: str, policy: Policy, *, actor: str) -> PolicyRecord:
    """Write the policy and its `policy.set` audit row, with no four-eyes check: for the
    platform's own code and tests. People change policies through `change_policy`."""
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


def weakenings(old: Policy, new: Policy, *, floor: int) -> list[str]:
    """Why `new` is weaker than `old`, one sentence each; empty when it is not.

    Per move of the stage machine: fewer approvals than before *and* than the floor; any
    change of the roles that may approve it (while it needs approvals). Then: unmapped
    authors let through where they were blocked, authorship taken from the registry where it
    was attested, and drift or experiment rollbacks without approval."""
    found = []
    for frm, targets in ALLOWED_MOVES.items():
        for to in sorted(targets):
            was, now = old.approval_rule(frm, to), new.approval_rule(frm, to)
            if was is None or now is None:  # a Policy covers every move; defensive
                continue
            move = f"{frm}->{to}"
            if now.required < was.required and now.required < floor:
                found.append(
                    f"{move}: approvals lowered from {was.required} to {now.required}, "
                    f"below the floor of {floor}"
                )
            if now.required > 0 and now.roles != was.roles:
                added = ", ".join(sorted(now.roles - was.roles)) or "none"
                removed = ", ".join(sorted(was.roles - now.roles)) or "none"
                found.append(f"{move}: approver roles changed (added {added}; removed {removed})")
    # Pinning "warn" weakens in any mode (dev's default would carry it into prod unseen).
    pinned = new.unmapped_author == "warn" and old.unmapped_author != "warn"
    if pinned or (unmapped_handling(old) == "block" and unmapped_handling(new) == "warn"):
        found.append("approvals of versions whose author is linked to no identity now count")
    # Likewise for authorship: "registry" trusts a name the MLflow client chose.
    trusted = new.authorship == "registry" and old.authorship != "registry"
    if trusted or (
        authorship_handling(old) == "attested" and authorship_handling(new) == "registry"
    ):
        found.append(
            "approvals no longer wait for an attested author: the MLflow author name, which "
            "the client sets, decides who wrote a version (authorship: registry)"
        )
    if new.drift.actions.rollback_applies_alone and not old.drift.actions.rollback_applies_alone:
        found.append("drift rollbacks now apply without approval")
    if _experiment_alone(new) and not _experiment_alone(old):
        found.append("experiment guardrail rollbacks now apply without approval")
    return found


def _experiment_alone(policy: Policy) -> bool:
    return policy.experiment is not None and policy.experiment.actions.rollback_applies_alone


def change_policy(
    session: Session, model_name: str, policy: Policy, *, actor: str, floor: int
) -> PolicyChange:
    """An admin's change: applied at once (status `applied`), or, if it weakens the policy,
    kept `pending` until another admin approves it. Audited either way."""
    base = _effective(session, model_name)
    weakens = weakenings(base, policy, floor=floor)
    change = PolicyChange(
        model_name=model_name,
        body=policy.model_dump(mode="json"),
        base=base.model_dump(mode="json"),
        weakens=weakens,
        proposed_by=actor,
    )
    if weakens:
        pending = _pending(session, model_name)
        if pending is not None:
            raise ConflictError(
                f"policy change {pending.id} for {model_name!r} is pending; "
                "approve or reject it first"
            )
        change.status, change.pending_key = PolicyChangeStatus.pending, model_name
        session.add(change)
        session.flush()
        audit.append(
            session,
            actor=actor,
            action="policy.proposed",
            entity_type="policy",
            entity_id=model_name,
            data={"change": change.id, "weakens": weakens, "policy": change.body},
        )
        return change
    change.status, change.decided_at = PolicyChangeStatus.applied, utcnow()
    session.add(change)
    session.flush()
    set_policy(session, model_name, policy, actor=actor)
    return change


def _pending(session: Session, model_name: str) -> PolicyChange | None:
    return session.exec(select(PolicyChange).where(PolicyChange.pending_key == model_name)).first()


def get_change(session: Session, change_id: str, *, lock: bool = False) -> PolicyChange:
    row = session.get(PolicyChange, change_id, with_for_update=lock)
    if row is None:
        raise NotFoundError(f"no policy change {change_id!r}")
    return row


def list_changes(
    session: Session,
    *,
    model: str | None,
    status: PolicyChangeStatus | None,
    offset: int,
    limit: int,
) -> list[PolicyChange]:
    query = select(PolicyChange)
    if model is not None:
        query = query.where(PolicyChange.model_name == model)
    if status is not None:
        query = query.where(PolicyChange.status == status)
    query = query.order_by(col(PolicyChange.proposed_at).desc(), col(PolicyChange.id))
    return list(session.exec(query.offset(offset).limit(limit)).all())


def decide_change(
    session: Session,
    *,
    change_id: str,
    actor: str,
    decision: Literal["approve", "reject"],
    comment: str | None,
    now: datetime | None = None,
) -> PolicyChange:
    """A second admin approves (the policy applies, in this transaction) or rejects a pending
    change. Its proposer may reject (withdraw) it, never approve it."""
    change = get_change(session, change_id, lock=True)
    if change.status is not PolicyChangeStatus.pending:
        raise ConflictError(f"policy change {change.id} is {change.status}, not pending")
    if decision == "approve" and actor == change.proposed_by:
        raise PermissionDenied(
            "the admin who proposed a policy change may not approve it; another admin must"
        )
    current = _effective(session, change.model_name).model_dump(mode="json")
    if decision == "approve" and current != change.base:
        raise ConflictError(
            f"the policy of {change.model_name!r} changed since change {change.id} was "
            "proposed; reject it and propose again"
        )
    change.status = (
        PolicyChangeStatus.applied if decision == "approve" else PolicyChangeStatus.rejected
    )
    change.pending_key, change.decided_by = None, actor
    change.decided_at, change.comment = now or utcnow(), comment
    session.add(change)
    data: dict[str, Any] = {
        "change": change.id,
        "proposed_by": change.proposed_by,
        "weakens": change.weakens,
        "comment": comment,
    }
    audit.append(
        session,
        actor=actor,
        action=f"policy.change_{'approved' if decision == 'approve' else 'rejected'}",
        entity_type="policy",
        entity_id=change.model_name,
        data=data,
    )
    if decision == "approve":
        set_policy(session, change.model_name, Policy.model_validate(change.body), actor=actor)
    return change
