"""Transitions: request, decide (approve or reject) and apply stage moves under gates.

Every function here writes its audit rows in the caller's transaction and never commits,
so a stage change, its approvals and their audit entries land together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from sqlmodel import Session, col, or_, select

from stagegate.errors import ConflictError, NotFoundError, PermissionDenied, TransitionRejected
from stagegate.governance import alarms, audit, endpoints, evaluations, identities, versions
from stagegate.governance.models import (
    OPEN_STATUSES,
    Approval,
    Deployment,
    ModelVersion,
    Transition,
    TransitionStatus,
)
from stagegate.governance.policies import get_policy, policies_for
from stagegate.governance.tokens import Principal
from stagegate.lifecycle import decisions, gates
from stagegate.lifecycle.policy import Policy
from stagegate.lifecycle.stages import DEPLOYMENT_ROLE, EXCLUSIVE, Role, Stage

REQUESTER_ROLES = frozenset({Role.author, Role.admin, Role.service})


@dataclass(frozen=True)
class StageChange:
    """A version whose stage moved; the caller mirrors it into the registry."""

    model: str
    version: int
    stage: Stage


@dataclass
class ApplyOutcome:
    transition: Transition
    changes: list[StageChange] = field(default_factory=list)
    already_applied: bool = False


def get_transition(session: Session, transition_id: str, *, lock: bool = False) -> Transition:
    """`lock` takes the row (FOR UPDATE on PostgreSQL; SQLite already holds the write lock),
    so concurrent decisions on one transition see each other's approvals."""
    row = session.get(Transition, transition_id, with_for_update=lock)
    if row is None:
        raise NotFoundError(f"no transition {transition_id!r}")
    return row


def list_transitions(
    session: Session, *, model: str | None, status: TransitionStatus | None, offset: int, limit: int
) -> list[Transition]:
    query = select(Transition)
    if model is not None:
        query = query.where(Transition.model_name == model)
    if status is not None:
        query = query.where(Transition.status == status)
    query = query.order_by(col(Transition.created_at).desc(), col(Transition.id))
    return list(session.exec(query.offset(offset).limit(limit)).all())


def approvals_of(session: Session, transition_id: str) -> list[Approval]:
    return list(
        session.exec(
            select(Approval)
            .where(Approval.transition_id == transition_id)
            .order_by(col(Approval.created_at))
        ).all()
    )


def _open_for(session: Session, version: ModelVersion) -> list[Transition]:
    return list(
        session.exec(
            select(Transition).where(
                Transition.model_name == version.model_name,
                Transition.version == version.version,
                col(Transition.status).in_(OPEN_STATUSES),
            )
        ).all()
    )


def _approved_at(session: Session, t: Transition) -> datetime | None:
    """When the transition's approvals were complete: decided_at once approved; for a pending
    one whose approvals gate passed at its last evaluation, its latest approval."""
    if t.status is TransitionStatus.approved:
        return t.decided_at
    passed = any(g["gate"] == "approvals" and g["passed"] for g in t.gate_results)
    if not passed:
        return None
    times = [a.created_at for a in approvals_of(session, t.id) if a.decision == "approve"]
    return max(times, default=t.created_at)


def _queue_ahead(session: Session, t: Transition) -> tuple[gates.QueuedFacts, ...]:
    """Open transitions of other versions into the same slot, ahead of `t` in the queue."""
    if t.to_stage not in EXCLUSIVE or t.to_stage is Stage.production:
        return ()
    others = session.exec(
        select(Transition).where(
            Transition.model_name == t.model_name,
            Transition.to_stage == t.to_stage,
            Transition.version != t.version,
            col(Transition.status).in_(OPEN_STATUSES),
        )
    ).all()
    mine = _approved_at(session, t)
    ahead = []
    for other in others:
        theirs = _approved_at(session, other)
        if theirs is None:
            continue
        if (
            other.status is TransitionStatus.approved
            or mine is None
            or ((theirs, other.created_at) < (mine, t.created_at))
        ):
            ahead.append(gates.QueuedFacts(other.version, other.id, theirs))
    return tuple(ahead)


def _context(
    session: Session,
    t: Transition,
    version: ModelVersion,
    now: datetime,
    policy: Policy | None = None,
    author: gates.AuthorFacts | None = None,
) -> gates.GateContext:
    """The world the gates judge. `policy` and `author`, when given, were read in this same
    transaction (by `decide`), so reading them again would only repeat the queries."""
    champion = versions.holder(session, t.model_name, Stage.production)
    occupant = (
        versions.holder(session, t.model_name, t.to_stage)
        if t.to_stage in EXCLUSIVE and t.to_stage is not Stage.production
        else None
    )
    policy = policy or get_policy(session, t.model_name)
    return gates.GateContext(
        from_stage=t.from_stage,
        to_stage=t.to_stage,
        requested_by=t.requested_by,
        version=versions.facts(session, version),
        champion=versions.facts(session, champion) if champion else None,
        approvals=[
            gates.ApprovalFacts(a.approver, a.role, a.decision == "approve", a.digest, a.created_at)
            for a in approvals_of(session, t.id)
        ],
        policy=policy,
        now=now,
        occupant=versions.facts(session, occupant) if occupant else None,
        reports=evaluations.facts(session, t.model_name, t.version),
        version_alarm=alarms.facts(session, t.model_name, t.version),
        champion_alarm=alarms.facts(session, t.model_name, champion.version) if champion else None,
        queue_ahead=_queue_ahead(session, t),
        author=author or identities.author_facts(session, version, policy),
    )


def _evaluate(
    session: Session,
    t: Transition,
    version: ModelVersion,
    now: datetime,
    actor: str,
    policy: Policy | None = None,
    author: gates.AuthorFacts | None = None,
) -> None:
    """Run the gates against the world as it is now; approve the transition if all pass."""
    results = gates.evaluate(_context(session, t, version, now, policy, author))
    t.gate_results = [{"gate": r.gate, "passed": r.passed, "reason": r.reason} for r in results]
    if gates.all_passed(results):
        t.status, t.decided_at = TransitionStatus.approved, now
        t.status_reason = "all gates passed"
        audit.append(
            session,
            actor=actor,
            action="transition.approved",
            entity_type="transition",
            entity_id=t.id,
            data={"model": t.model_name, "version": t.version, "gates": t.gate_results},
        )
    session.add(t)


def _check_exclusive(session: Session, version: ModelVersion, to_stage: Stage) -> None:
    # Production displaces the champion (it retires); shadow and canary hold one version each.
    if to_stage in EXCLUSIVE and to_stage is not Stage.production:
        other = versions.holder(session, version.model_name, to_stage)
        if other is not None and other.version != version.version:
            raise ConflictError(
                f"{version.model_name} v{other.version} is already in {to_stage}; move it on first"
            )


def request(
    session: Session,
    *,
    principal: Principal,
    model: str,
    version: int,
    to_stage: Stage,
    reason: str,
    now: datetime,
    idempotency_key: str | None = None,
) -> tuple[Transition, bool]:
    """Open a transition. Returns (transition, created). Gates run at once."""
    if principal.role not in REQUESTER_ROLES:
        raise PermissionDenied(f"role {principal.role} may not request transitions")
    if idempotency_key is not None:
        seen = session.exec(
            select(Transition).where(Transition.idempotency_key == idempotency_key)
        ).first()
        if seen is not None:
            return seen, False
    row = versions.get_version(session, model, version, lock=True)
    why_not = gates.check_move(row.stage, to_stage)
    if why_not:
        raise TransitionRejected(why_not)
    if open_ := _open_for(session, row):
        raise ConflictError(f"{model} v{version} already has an open transition {open_[0].id}")
    t = Transition(
        model_name=model,
        version=version,
        from_stage=row.stage,
        to_stage=to_stage,
        reason=reason,
        requested_by=principal.name,
        idempotency_key=idempotency_key,
        created_at=now,
    )
    session.add(t)
    session.flush()
    audit.append(
        session,
        actor=principal.name,
        action="transition.requested",
        entity_type="transition",
        entity_id=t.id,
        data={
            "model": model,
            "version": version,
            "from": row.stage.value,
            "to": to_stage.value,
            "reason": reason,
        },
    )
    _evaluate(session, t, row, now, principal.name)
    return t, True


def decide(
    session: Session,
    *,
    principal: Principal,
    transition_id: str,
    decision: Literal["approve", "reject"],
    comment: str | None,
    now: datetime,
) -> Transition:
    """Record one approval or rejection, then re-run the gates against the current champion."""
    t = get_transition(session, transition_id, lock=True)
    version = versions.get_version(session, t.model_name, t.version)
    policy = get_policy(session, t.model_name)
    author = identities.author_facts(session, version, policy)
    earlier = session.exec(
        select(Approval).where(Approval.transition_id == t.id, Approval.approver == principal.name)
    ).first()
    # The same pure verdict the API shows the caller as `allowed_actions`.
    verdict = decisions.verdict(
        _facts(principal, t, version.stage, policy, author, earlier, now), decision
    )
    if not verdict.allowed:
        refuse = (
            PermissionDenied if verdict.refusal is decisions.Refusal.forbidden else ConflictError
        )
        raise refuse(verdict.reason or "refused")
    unknown = author.warning()

    session.add(
        Approval(
            transition_id=t.id,
            approver=principal.name,
            role=principal.role,
            decision=decision,
            comment=comment,
            digest=version.digest,
            created_at=now,
        )
    )
    session.flush()
    audit.append(
        session,
        actor=principal.name,
        action=f"approval.{decision}",
        entity_type="transition",
        entity_id=t.id,
        data={
            "model": t.model_name,
            "version": t.version,
            "digest": version.digest,
            "comment": comment,
            # Recorded where the policy lets an unmapped author's version through (warn).
            **({"warning": unknown} if unknown else {}),
        },
    )
    if decision == "reject":
        _set_status(
            session,
            t,
            TransitionStatus.rejected,
            f"rejected by {principal.name}",
            actor=principal.name,
            action="rejected",
            data={"comment": comment},
            decided_at=now,
        )
        return t
    _evaluate(session, t, version, now, principal.name, policy, author)
    return t


def _facts(
    principal: Principal,
    t: Transition,
    version_stage: Stage,
    policy: Policy,
    author: gates.AuthorFacts,
    earlier: Approval | None,
    now: datetime,
) -> decisions.DecisionFacts:
    return decisions.DecisionFacts(
        caller=principal.name,
        role=principal.role,
        transition_id=t.id,
        status=t.status.value,
        model=t.model_name,
        version=t.version,
        from_stage=t.from_stage,
        to_stage=t.to_stage,
        version_stage=version_stage,
        requested_by=t.requested_by,
        author=author,
        rule=policy.approval_rule(t.from_stage, t.to_stage),
        approval_ttl_days=policy.approval_ttl_days,
        prior=(
            decisions.PriorDecision(earlier.decision, earlier.created_at)
            if earlier is not None
            else None
        ),
        now=now,
    )


@dataclass(frozen=True)
class _Listed:
    """The columns of a version that `allowed_actions` reads (an `identities.Authored`)."""

    stage: Stage
    creator: str | None
    digest: str | None
    attested_by: str | None
    attested_digest: str | None


def allowed_actions(
    session: Session, principal: Principal, rows: Sequence[Transition], now: datetime
) -> dict[str, dict[decisions.Decision, decisions.Verdict]]:
    """What the caller may decide on each transition, and why not: `decide`'s own verdict,
    from facts read in a fixed number of queries however many transitions are shown."""
    if not rows:
        return {}
    names = {t.model_name for t in rows}
    # Only the columns the verdicts read: whole rows would parse every version's metrics.
    found = session.exec(
        select(  # type: ignore[call-overload]  # sqlmodel types up to 4 columns; 7 run fine
            ModelVersion.model_name,
            ModelVersion.version,
            ModelVersion.stage,
            ModelVersion.creator,
            ModelVersion.digest,
            ModelVersion.attested_by,
            ModelVersion.attested_digest,
        ).where(
            col(ModelVersion.model_name).in_(sorted(names)),
            col(ModelVersion.version).in_(sorted({t.version for t in rows})),
        )
    ).all()
    by_key = {
        (name, number): _Listed(Stage(stage), creator, digest, attester, attested)
        for name, number, stage, creator, digest, attester, attested in found
    }
    linked = identities.identities_of(session, {r.creator for r in by_key.values() if r.creator})
    policy_of = policies_for(session, names)
    mine = {
        a.transition_id: a
        for a in session.exec(
            select(Approval).where(
                col(Approval.transition_id).in_([t.id for t in rows]),
                Approval.approver == principal.name,
            )
        ).all()
    }
    verdicts = {}
    for t in rows:
        # A foreign key in spirit: versions are never deleted.
        version = by_key[(t.model_name, t.version)]
        policy = policy_of[t.model_name]
        identity = linked.get(version.creator) if version.creator else None
        author = identities.author_of(version, identity, policy)
        facts = _facts(principal, t, version.stage, policy, author, mine.get(t.id), now)
        verdicts[t.id] = decisions.allowed_actions(facts)
    return verdicts


def approvals_for(session: Session, ids: Sequence[str]) -> dict[str, list[Approval]]:
    """The approvals of each transition, oldest first, in one query."""
    found: dict[str, list[Approval]] = {i: [] for i in ids}
    if ids:
        for a in session.exec(
            select(Approval)
            .where(col(Approval.transition_id).in_(list(ids)))
            .order_by(col(Approval.created_at), col(Approval.id))
        ).all():
            found[a.transition_id].append(a)
    return found


def reevaluate(session: Session, *, transition_id: str, now: datetime, actor: str) -> Transition:
    """Re-run the gates of a pending transition (a slot freed, a policy changed)."""
    t = get_transition(session, transition_id, lock=True)
    if t.status is not TransitionStatus.pending:
        return t
    version = versions.get_version(session, t.model_name, t.version)
    if version.stage != t.from_stage:
        _set_status(
            session,
            t,
            TransitionStatus.cancelled,
            f"version moved to {version.stage}",
            actor=actor,
            action="cancelled",
        )
        return t
    _evaluate(session, t, version, now, actor)
    return t


def _set_status(
    session: Session,
    t: Transition,
    status: TransitionStatus,
    reason: str,
    *,
    actor: str,
    action: str,
    data: dict[str, object] | None = None,
    decided_at: datetime | None = None,
) -> None:
    """Change a transition's status and write its audit row, in the caller's transaction."""
    t.status, t.status_reason = status, reason
    if decided_at is not None:
        t.decided_at = decided_at
    session.add(t)
    audit.append(
        session,
        actor=actor,
        action=f"transition.{action}",
        entity_type="transition",
        entity_id=t.id,
        data={"reason": reason} if data is None else data,
    )


def _fail(session: Session, t: Transition, reason: str, actor: str, now: datetime) -> None:
    _set_status(
        session,
        t,
        TransitionStatus.failed,
        reason,
        actor=actor,
        action="failed",
        decided_at=t.decided_at or now,
    )


def _move(
    session: Session,
    v: ModelVersion,
    to_stage: Stage,
    t: Transition,
    now: datetime,
    backend: str,
    changes: list[StageChange],
) -> None:
    """Move one version, closing and opening its deployment windows."""
    for dep in session.exec(
        select(Deployment).where(
            Deployment.model_name == v.model_name,
            Deployment.version == v.version,
            col(Deployment.ended_at).is_(None),
        )
    ).all():
        dep.ended_at, dep.ended_by_transition_id = now, t.id
        session.add(dep)
    if to_stage in DEPLOYMENT_ROLE:
        session.add(
            Deployment(
                model_name=v.model_name,
                version=v.version,
                role=DEPLOYMENT_ROLE[to_stage],
                backend=backend,
                transition_id=t.id,
                started_at=now,
            )
        )
    v.stage, v.stage_changed_at = to_stage, now
    session.add(v)
    changes.append(StageChange(v.model_name, v.version, to_stage))


def _previous_champion(session: Session, model: str, current: int) -> ModelVersion | None:
    """The most recent champion before `current` that has since retired."""
    deps = session.exec(
        select(Deployment)
        .where(
            Deployment.model_name == model,
            Deployment.role == DEPLOYMENT_ROLE[Stage.production],
            Deployment.version != current,
            col(Deployment.ended_at).is_not(None),
        )
        .order_by(col(Deployment.ended_at).desc())
    ).all()
    for dep in deps:
        v = versions.get_version(session, model, dep.version)
        if v.stage is Stage.retired:
            return v
    return None


def _held_back(
    session: Session,
    t: Transition,
    v: ModelVersion,
    current_digest: str | None,
    actor: str,
    now: datetime,
) -> bool:
    """Whatever stops an approved transition at apply time, recorded: True if it stopped."""
    if v.stage != t.from_stage:
        _fail(session, t, f"version moved to {v.stage} since approval", actor, now)
        return True
    if current_digest is not None and current_digest != v.digest:
        audit.append(
            session,
            actor=actor,
            action="version.digest_changed",
            entity_type="version",
            entity_id=f"{v.model_name}/{v.version}",
            data={"old": v.digest, "new": current_digest},
        )
        v.digest = current_digest
        session.add(v)
        _fail(session, t, "the artifact changed after approval; approvals are void", actor, now)
        return True
    try:
        _check_exclusive(session, v, t.to_stage)
    except ConflictError as exc:
        # Another transition took the slot after this one was approved: wait, don't fail.
        # Approvals stay (they still expire); reconcile re-runs the gates when it frees up.
        _set_status(
            session,
            t,
            TransitionStatus.pending,
            f"waiting: {exc.detail}",
            actor=actor,
            action="deferred",
            data={"reason": exc.detail},
        )
        return True
    # The world may have moved since the approval (approvals expired, a new champion, a
    # report superseded): the gates decide again, now, and a failing one sends it back.
    results = gates.evaluate(_context(session, t, v, now))
    failed = [r for r in results if not r.passed]
    if failed:
        t.gate_results = [{"gate": r.gate, "passed": r.passed, "reason": r.reason} for r in results]
        reason = "; ".join(f"{r.gate}: {r.reason}" for r in failed)
        _set_status(
            session,
            t,
            TransitionStatus.pending,
            f"gates failed at apply: {reason}",
            actor=actor,
            action="deferred",
            data={"reason": reason, "gates": t.gate_results},
        )
        return True
    return False


def apply(
    session: Session,
    *,
    transition_id: str,
    actor: str,
    current_digest: str | None,
    now: datetime,
    backend: str = "none",
) -> ApplyOutcome:
    """Carry out an approved transition. Idempotent: applying twice changes nothing more.

    A transition that can no longer be applied (the version moved, its artifact changed)
    is marked failed rather than raised, so the caller commits that record.
    """
    t = get_transition(session, transition_id, lock=True)
    if t.status is TransitionStatus.applied:
        return ApplyOutcome(t, already_applied=True)
    if t.status is not TransitionStatus.approved:
        raise ConflictError(f"transition {t.id} is {t.status}, not approved")
    v = versions.get_version(session, t.model_name, t.version)
    outcome = ApplyOutcome(t)
    if _held_back(session, t, v, current_digest, actor, now):
        return outcome

    displaced: list[str] = []
    if t.to_stage is Stage.production:
        champion = versions.holder(session, t.model_name, Stage.production)
        if champion is not None and champion.version != v.version:
            _move(session, champion, Stage.retired, t, now, backend, outcome.changes)
            displaced.append(f"v{champion.version} production->retired")
    restored = None
    if t.to_stage is Stage.rolled_back and t.from_stage is Stage.production:
        restored = _previous_champion(session, t.model_name, v.version)
    _move(session, v, t.to_stage, t, now, backend, outcome.changes)
    if restored is not None:
        _move(session, restored, Stage.production, t, now, backend, outcome.changes)
        displaced.append(f"v{restored.version} retired->production (restored)")

    # The endpoint's desired state moves with the stages, in this same transaction.
    endpoint = endpoints.desire(session, t.model_name, actor=actor)
    t.status, t.applied_at, t.status_reason = TransitionStatus.applied, now, "applied"
    t.generation = endpoint.generation
    session.add(t)
    audit.append(
        session,
        actor=actor,
        action="transition.applied",
        entity_type="transition",
        entity_id=t.id,
        data={
            "model": t.model_name,
            "version": t.version,
            "from": t.from_stage.value,
            "to": t.to_stage.value,
            "also": displaced,
            "generation": endpoint.generation,
        },
    )
    # Anything else still open for the versions that moved was asked about a stage they left.
    for change in outcome.changes:
        moved = versions.get_version(session, change.model, change.version)
        for other in _open_for(session, moved):
            if other.id != t.id:
                _set_status(
                    session,
                    other,
                    TransitionStatus.cancelled,
                    f"superseded by transition {t.id}",
                    actor=actor,
                    action="cancelled",
                    data={"superseded_by": t.id},
                )
    return outcome


def pending_ids(
    session: Session, *, model: str | None = None, version: int | None = None
) -> list[str]:
    """Ids of pending transitions, of one version when `model` and `version` are given."""
    query = select(Transition.id).where(Transition.status == TransitionStatus.pending)
    if model is not None:
        query = query.where(Transition.model_name == model)
    if version is not None:
        query = query.where(Transition.version == version)
    return list(session.exec(query).all())


def approved_before(session: Session, cutoff: datetime) -> list[str]:
    """Ids of transitions approved before `cutoff` and still not applied."""
    return list(
        session.exec(
            select(Transition.id).where(
                Transition.status == TransitionStatus.approved,
                col(Transition.decided_at) < cutoff,
            )
        ).all()
    )


def touched(session: Session, transition_id: str) -> list[tuple[str, int, Stage]]:
    """Versions whose deployment windows the transition opened or closed, with their stage."""
    t = get_transition(session, transition_id)
    found = {(t.model_name, t.version)}
    for dep in session.exec(
        select(Deployment).where(
            or_(
                col(Deployment.transition_id) == transition_id,
                col(Deployment.ended_by_transition_id) == transition_id,
            )
        )
    ).all():
        found.add((dep.model_name, dep.version))
    return [(m, v, versions.get_version(session, m, v).stage) for m, v in sorted(found)]
