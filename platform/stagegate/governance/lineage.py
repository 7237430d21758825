"""Lineage queries: what served production at a time and why, and who consumes a version."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, or_, select

from stagegate.governance import versions
from stagegate.governance.models import (
    Approval,
    Dataset,
    Deployment,
    ModelVersion,
    Transition,
    TransitionStatus,
    VersionDataset,
    VersionDependency,
)
from stagegate.lifecycle.stages import DeploymentRole, Stage


@dataclass(frozen=True)
class ProductionAt:
    version: ModelVersion
    deployment: Deployment
    # The transition that approved this version into production. After a rollback the
    # window is opened by the rollback, but the approvals that count are the promotion's.
    promotion: Transition
    approvals: list[Approval]


def production_at(session: Session, model: str, at: datetime) -> ProductionAt | None:
    """The champion of `model` at instant `at`, with the promotion and approvals behind it."""
    versions.get_model(session, model)
    dep = session.exec(
        select(Deployment)
        .where(
            Deployment.model_name == model,
            Deployment.role == DeploymentRole.champion,
            col(Deployment.started_at) <= at,
            or_(col(Deployment.ended_at).is_(None), col(Deployment.ended_at) > at),
        )
        .order_by(col(Deployment.started_at).desc())
    ).first()
    if dep is None:
        return None
    promotion = session.exec(
        select(Transition)
        .where(
            Transition.model_name == model,
            Transition.version == dep.version,
            Transition.to_stage == Stage.production,
            Transition.status == TransitionStatus.applied,
            col(Transition.applied_at) <= dep.started_at,
        )
        .order_by(col(Transition.applied_at).desc())
    ).first()
    if promotion is None:  # cannot happen through the API; fall back to the window's opener
        promotion = session.get(Transition, dep.transition_id)
        assert promotion is not None  # foreign key
    approvals = session.exec(
        select(Approval)
        .where(Approval.transition_id == promotion.id, Approval.decision == "approve")
        .order_by(col(Approval.created_at))
    ).all()
    return ProductionAt(
        versions.get_version(session, model, dep.version), dep, promotion, list(approvals)
    )


def datasets_of(session: Session, version: ModelVersion) -> list[dict[str, Any]]:
    rows = session.exec(
        select(Dataset, VersionDataset).where(
            VersionDataset.dataset_id == Dataset.id, VersionDataset.version_id == version.id
        )
    ).all()
    return [
        {"name": d.name, "source": d.source, "digest": d.digest, "context": link.context}
        for d, link in rows
    ]


def upstream_of(session: Session, version: ModelVersion) -> list[tuple[str, int]]:
    rows = session.exec(
        select(VersionDependency).where(VersionDependency.version_id == version.id)
    ).all()
    return sorted((r.upstream_model, r.upstream_version) for r in rows)


def consumers_of(
    session: Session, model: str, version: int, *, production_only: bool = False
) -> list[ModelVersion]:
    """Versions that declared `model:version` upstream (e.g. rankers fed by an embedder)."""
    versions.get_version(session, model, version)
    query = (
        select(ModelVersion)
        .join(VersionDependency, col(VersionDependency.version_id) == col(ModelVersion.id))
        .where(
            VersionDependency.upstream_model == model, VersionDependency.upstream_version == version
        )
    )
    if production_only:
        query = query.where(ModelVersion.stage == Stage.production)
    return list(
        session.exec(query.order_by(col(ModelVersion.model_name), col(ModelVersion.version))).all()
    )


def history_of(
    session: Session, version: ModelVersion
) -> tuple[list[Transition], list[Approval], list[Deployment]]:
    transitions = list(
        session.exec(
            select(Transition)
            .where(
                Transition.model_name == version.model_name, Transition.version == version.version
            )
            .order_by(col(Transition.created_at))
        ).all()
    )
    ids = [t.id for t in transitions]
    approvals = (
        list(
            session.exec(
                select(Approval)
                .where(col(Approval.transition_id).in_(ids))
                .order_by(col(Approval.created_at))
            ).all()
        )
        if ids
        else []
    )
    deployments = list(
        session.exec(
            select(Deployment)
            .where(
                Deployment.model_name == version.model_name, Deployment.version == version.version
            )
            .order_by(col(Deployment.started_at))
        ).all()
    )
    return transitions, approvals, deployments
