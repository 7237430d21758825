"""Who may approve or reject a transition, and why not: one pure function, facts in, verdict out.

`governance.transitions.decide` refuses with the verdict's reason, and the API shows each
caller the same verdicts as `allowed_actions`, so the UI never offers what the API refuses.
The checks run in the order the API meets them: the route's role check first, then the
transition's state, separation of duties (the authors of record, the policy's roles, an
unmapped author, a missing attestation), and one decision per person.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

from stagegate.lifecycle.gates import AuthorFacts
from stagegate.lifecycle.policy import ApprovalRule
from stagegate.lifecycle.stages import Role, Stage

Decision = Literal["approve", "reject"]
DECISIONS: tuple[Decision, ...] = ("approve", "reject")

# Roles the decision route lets in at all; the policy rule for the move then narrows them.
DECIDER_ROLES: frozenset[Role] = frozenset({Role.approver, Role.admin, Role.author})


def role_refusal(role: Role, allowed: Iterable[Role]) -> str:
    """Why a role is refused at a route (the API's role check words it this way too)."""
    names = ", ".join(sorted(allowed))
    return f"role {role} may not do this (needs {names})"


class Refusal(StrEnum):
    """How a refusal is answered: the caller may never do it (403), or the world moved (409)."""

    forbidden = "forbidden"
    conflict = "conflict"


@dataclass(frozen=True)
class PriorDecision:
    """The caller's own earlier decision on the transition, if any."""

    decision: str  # approve | reject
    created_at: datetime


@dataclass(frozen=True)
class DecisionFacts:
    """Everything a decision depends on, read when it is made (or shown)."""

    caller: str
    role: Role
    transition_id: str
    status: str  # the transition's status: only `pending` takes decisions
    model: str
    version: int
    from_stage: Stage
    to_stage: Stage
    version_stage: Stage  # where the version is now
    requested_by: str
    author: AuthorFacts
    rule: ApprovalRule | None  # the policy rule covering the move
    approval_ttl_days: int
    prior: PriorDecision | None
    now: datetime


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None  # a sentence, when refused
    refusal: Refusal | None = None

    @classmethod
    def forbid(cls, reason: str) -> Verdict:
        return cls(False, reason, Refusal.forbidden)

    @classmethod
    def conflict(cls, reason: str) -> Verdict:
        return cls(False, reason, Refusal.conflict)


ALLOWED = Verdict(True)


def verdict(f: DecisionFacts, decision: Decision) -> Verdict:
    """May `f.caller` take `decision` on the transition now? If not, the reason."""
    if f.role not in DECIDER_ROLES:
        return Verdict.forbid(role_refusal(f.role, DECIDER_ROLES))
    if (moved := _state_refusal(f)) is not None:
        return Verdict.conflict(moved)
    if (duty := _duty_refusal(f, decision)) is not None:
        return Verdict.forbid(duty)
    if f.prior is not None:
        return Verdict.conflict(_decided_before(f))
    return ALLOWED


def _state_refusal(f: DecisionFacts) -> str | None:
    """The transition no longer takes decisions (409)."""
    if f.status != "pending":
        return f"transition {f.transition_id} is {f.status}, not pending"
    if f.version_stage != f.from_stage:
        return (
            f"{f.model} v{f.version} moved to {f.version_stage} since the transition "
            f"was requested from {f.from_stage}"
        )
    return None


def _duty_refusal(f: DecisionFacts, decision: Decision) -> str | None:
    """Separation of duties and the policy's roles forbid this caller (403)."""
    if f.caller == f.requested_by:
        return "the requester of a transition may not approve it"
    if (author := _author_refusal(f)) is not None:
        return author
    if f.rule is None or f.role not in f.rule.roles:
        allowed = "/".join(sorted(f.rule.roles)) if f.rule else "nobody"
        return f"role {f.role} cannot decide {f.from_stage}->{f.to_stage} (needs {allowed})"
    if decision != "approve":
        return None  # what follows holds approvals back; a rejection is always possible
    unknown = f.author.warning()
    if unknown and f.author.unmapped == "block":
        return (
            f"{unknown}, so separation of duties cannot be checked: the policy blocks "
            "approvals until an admin links it (stagegate token link IDENTITY MLFLOW_USER) "
            "or sets unmapped_author: warn"
        )
    return f.author.awaiting_attestation(f.model, f.version, f.to_stage)


def _author_refusal(f: DecisionFacts) -> str | None:
    """The caller is an author of record: the MLflow name, its linked identity, or the
    identity that attested authorship."""
    if f.caller in {f.author.mlflow_user, f.author.identity}:
        linked = (
            f" (MLflow user {f.author.mlflow_user!r} is linked to {f.author.identity})"
            if f.author.identity == f.caller and f.author.mlflow_user != f.caller
            else ""
        )
        return (
            f"{f.caller} is the author of {f.model} v{f.version}{linked}; "
            "the author of a version may not approve its transitions"
        )
    if f.caller == f.author.attester:
        return (
            f"{f.caller} attested authorship of {f.model} v{f.version}; "
            "the author of a version may not approve its transitions"
        )
    return None


def _decided_before(f: DecisionFacts) -> str:
    """One decision per person per transition, expired or not: an approver who let their
    approval lapse cannot renew it alone, nor count twice (docs/approvals-and-audit.md)."""
    assert f.prior is not None
    lapsed = f.prior.created_at + timedelta(days=f.approval_ttl_days)
    if f.prior.decision == "approve" and lapsed <= f.now:
        return (
            f"{f.caller} already approved transition {f.transition_id}; that "
            f"approval expired at {lapsed:%Y-%m-%d %H:%M} UTC and its approver cannot renew "
            "it: another approver must approve, or the move is requested again"
        )
    return f"{f.caller} already decided transition {f.transition_id}"


def allowed_actions(f: DecisionFacts) -> dict[Decision, Verdict]:
    """The verdict for each decision, as the caller would meet it."""
    return {d: verdict(f, d) for d in DECISIONS}
