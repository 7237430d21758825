"""Turn governance rows into response bodies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlmodel import Session

from stagegate.api import schemas
from stagegate.db import utcnow
from stagegate.governance import lineage, transitions, versions
from stagegate.governance.models import (
    Approval,
    Deployment,
    Evaluation,
    ModelVersion,
    PolicyChange,
    Transition,
)
from stagegate.governance.tokens import Principal
from stagegate.lifecycle import decisions
from stagegate.lifecycle.policy import Policy


def approval(a: Approval) -> schemas.ApprovalPublic:
    return schemas.ApprovalPublic.model_validate(a, from_attributes=True)


def transitions_for(
    session: Session, rows: Sequence[Transition], principal: Principal
) -> list[schemas.TransitionPublic]:
    """Transitions with their approvals and what the caller may decide, in a fixed number of
    queries however many there are."""
    approvals = transitions.approvals_for(session, [t.id for t in rows])
    verdicts = transitions.allowed_actions(session, principal, rows, utcnow())
    return [
        schemas.TransitionPublic(
            id=t.id,
            model=t.model_name,
            version=t.version,
            from_stage=t.from_stage,
            to_stage=t.to_stage,
            reason=t.reason,
            status=t.status,
            status_reason=t.status_reason,
            requested_by=t.requested_by,
            created_at=t.created_at,
            decided_at=t.decided_at,
            applied_at=t.applied_at,
            gates=[schemas.GateResultPublic.model_validate(g) for g in t.gate_results],
            approvals=[approval(a) for a in approvals[t.id]],
            allowed_actions=_actions(verdicts[t.id]),
        )
        for t in rows
    ]


def _actions(
    verdicts: Mapping[decisions.Decision, decisions.Verdict],
) -> schemas.AllowedActionsPublic:
    def public(v: decisions.Verdict) -> schemas.ActionPublic:
        return schemas.ActionPublic(allowed=v.allowed, reason=v.reason)

    return schemas.AllowedActionsPublic(
        approve=public(verdicts["approve"]), reject=public(verdicts["reject"])
    )


def transition(session: Session, t: Transition, principal: Principal) -> schemas.TransitionPublic:
    return transitions_for(session, [t], principal)[0]


def version(session: Session, v: ModelVersion) -> schemas.VersionPublic:
    return schemas.VersionPublic(
        model=v.model_name,
        version=v.version,
        stage=v.stage,
        run_id=v.run_id,
        source=v.source,
        creator=v.creator,
        digest=v.digest,
        code_commit=v.code_commit,
        metrics=v.metrics,
        params=v.params,
        registered_at=v.registered_at,
        stage_changed_at=v.stage_changed_at,
        datasets=[schemas.DatasetPublic.model_validate(d) for d in lineage.datasets_of(session, v)],
        depends_on=[
            schemas.VersionRefPublic(
                model=name,
                version=number,
                stage=(up.stage if (up := versions.find_version(session, name, number)) else None),
            )
            for name, number in lineage.upstream_of(session, v)
        ],
        reference_source=v.reference_source,
        attested_by=v.attested_by,
        attested_at=v.attested_at,
        attested_digest=v.attested_digest,
    )


def deployment(d: Deployment) -> schemas.DeploymentPublic:
    return schemas.DeploymentPublic.model_validate(d, from_attributes=True)


def report_url(e: Evaluation) -> str | None:
    """Where the API serves the evaluation's stored HTML report, if it has one."""
    return f"/api/v1/reports/{e.id}" if e.summary.get("report") else None


def policy_change(change: PolicyChange) -> schemas.PolicyChangePublic:
    return schemas.PolicyChangePublic(
        id=change.id,
        model=change.model_name,
        status=change.status,
        policy=Policy.model_validate(change.body),
        weakens=list(change.weakens),
        proposed_by=change.proposed_by,
        proposed_at=change.proposed_at,
        decided_by=change.decided_by,
        decided_at=change.decided_at,
        comment=change.comment,
    )
