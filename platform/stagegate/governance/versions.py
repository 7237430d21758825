"""Model versions as the governance database records them, with their lineage inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from sqlmodel import Session, col, func, or_, select

from stagegate.errors import NotFoundError
from stagegate.governance import audit
from stagegate.governance.models import (
    Dataset,
    ModelVersion,
    RegisteredModel,
    VersionDataset,
    VersionDependency,
)
from stagegate.lifecycle.gates import VersionFacts
from stagegate.lifecycle.stages import LIVE, Stage


@dataclass(frozen=True)
class DatasetInput:
    name: str
    source: str
    digest: str
    context: str | None = None


@dataclass(frozen=True)
class VersionRecord:
    """What intake learned about a version from the registry."""

    name: str
    version: int
    source: str
    run_id: str | None
    creator: str | None
    registered_at: datetime
    digest: str
    code_commit: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    datasets: Sequence[DatasetInput] = ()
    depends_on: Sequence[tuple[str, int]] = ()
    reference_source: str | None = None


def get_version(session: Session, name: str, version: int, *, lock: bool = False) -> ModelVersion:
    query = select(ModelVersion).where(
        ModelVersion.model_name == name, ModelVersion.version == version
    )
    row = session.exec(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFoundError(f"model {name!r} has no version {version}")
    return row


def find_version(session: Session, name: str, version: int) -> ModelVersion | None:
    try:
        return get_version(session, name, version)
    except NotFoundError:
        return None


def get_model(session: Session, name: str) -> RegisteredModel:
    row = session.get(RegisteredModel, name)
    if row is None:
        raise NotFoundError(f"no model named {name!r}")
    return row


def holder(session: Session, name: str, stage: Stage) -> ModelVersion | None:
    """The version of `name` in an exclusive stage, if any."""
    return session.exec(
        select(ModelVersion).where(ModelVersion.model_name == name, ModelVersion.stage == stage)
    ).first()


def dataset_count(session: Session, version_id: int | None) -> int:
    return int(
        session.exec(
            select(func.count())
            .select_from(VersionDataset)
            .where(VersionDataset.version_id == version_id)
        ).one()
    )


def facts(session: Session, row: ModelVersion) -> VersionFacts:
    return VersionFacts(
        name=row.model_name,
        version=row.version,
        stage=row.stage,
        digest=row.digest,
        author=row.creator,
        run_id=row.run_id,
        metrics=dict(row.metrics),
        dataset_count=dataset_count(session, row.id),
        reference_source=row.reference_source,
    )


def record_version(
    session: Session, rec: VersionRecord, *, actor: str
) -> tuple[ModelVersion, bool]:
    """Insert the version and its lineage once. A changed digest is recorded, voiding approvals."""
    existing = find_version(session, rec.name, rec.version)
    if existing is not None:
        if existing.digest != rec.digest:
            audit.append(
                session,
                actor=actor,
                action="version.digest_changed",
                entity_type="version",
                entity_id=f"{rec.name}/{rec.version}",
                data={"old": existing.digest, "new": rec.digest},
            )
            existing.digest = rec.digest
            session.add(existing)
        return existing, False

    if session.get(RegisteredModel, rec.name) is None:
        session.add(RegisteredModel(name=rec.name))
        session.flush()
    row = ModelVersion(
        model_name=rec.name,
        version=rec.version,
        source=rec.source,
        run_id=rec.run_id,
        creator=rec.creator,
        digest=rec.digest,
        code_commit=rec.code_commit,
        metrics=dict(rec.metrics),
        params=dict(rec.params),
        registered_at=rec.registered_at,
        reference_source=rec.reference_source,
    )
    session.add(row)
    session.flush()
    for ds in rec.datasets:
        dataset = session.exec(
            select(Dataset).where(Dataset.source == ds.source, Dataset.digest == ds.digest)
        ).first()
        if dataset is None:
            dataset = Dataset(name=ds.name, source=ds.source, digest=ds.digest)
            session.add(dataset)
            session.flush()
        assert dataset.id is not None
        assert row.id is not None
        session.add(VersionDataset(version_id=row.id, dataset_id=dataset.id, context=ds.context))
    for up_name, up_version in dict.fromkeys(rec.depends_on):
        assert row.id is not None
        session.add(
            VersionDependency(
                version_id=row.id, upstream_model=up_name, upstream_version=up_version
            )
        )
    audit.append(
        session,
        actor=actor,
        action="version.recorded",
        entity_type="version",
        entity_id=f"{rec.name}/{rec.version}",
        data={
            "digest": rec.digest,
            "run_id": rec.run_id,
            "creator": rec.creator,
            "datasets": [d.digest for d in rec.datasets],
            "depends_on": [f"{n}:{v}" for n, v in rec.depends_on],
        },
    )
    return row, True


def list_models(session: Session, *, offset: int, limit: int) -> tuple[list[RegisteredModel], int]:
    total = int(session.exec(select(func.count()).select_from(RegisteredModel)).one())
    rows = session.exec(
        select(RegisteredModel).order_by(col(RegisteredModel.name)).offset(offset).limit(limit)
    ).all()
    return list(rows), total


class VersionStage(NamedTuple):
    model_name: str
    version: int
    stage: Stage
    stage_changed_at: datetime


def versions_of(session: Session, names: Sequence[str]) -> dict[str, list[VersionStage]]:
    """Each named model's versions in order, with their stages, in one query: a page of models
    would otherwise cost a query per model (N+1). Only these columns: a listing has no use for
    metrics and params, and loading whole rows cost more than the query itself."""
    grouped: dict[str, list[VersionStage]] = {name: [] for name in names}
    if not grouped:
        return grouped
    rows = session.exec(
        select(
            ModelVersion.model_name,
            ModelVersion.version,
            ModelVersion.stage,
            ModelVersion.stage_changed_at,
        )
        .where(col(ModelVersion.model_name).in_(list(grouped)))
        .order_by(col(ModelVersion.model_name), col(ModelVersion.version))
    ).all()
    for name, number, stage, changed in rows:
        grouped[name].append(VersionStage(name, number, Stage(stage), changed))
    return grouped


def list_versions(session: Session, name: str) -> list[ModelVersion]:
    get_model(session, name)
    return list(
        session.exec(
            select(ModelVersion)
            .where(ModelVersion.model_name == name)
            .order_by(col(ModelVersion.version))
        ).all()
    )


def known_versions(session: Session) -> set[tuple[str, int]]:
    """(model, version) of every recorded version."""
    rows = session.exec(select(ModelVersion.model_name, ModelVersion.version)).all()
    return {(name, number) for name, number in rows}


def live_or_moved_since(session: Session, since: datetime) -> list[tuple[str, int, Stage]]:
    """(model, version, stage) of versions that are live or changed stage since `since`."""
    rows = session.exec(
        select(ModelVersion).where(
            or_(col(ModelVersion.stage).in_(LIVE), col(ModelVersion.stage_changed_at) >= since)
        )
    ).all()
    return [(v.model_name, v.version, v.stage) for v in rows]


def in_stages(session: Session, stages: Sequence[Stage]) -> list[tuple[str, int]]:
    """(model, version) of every version in one of `stages`."""
    rows = session.exec(
        select(ModelVersion.model_name, ModelVersion.version).where(
            col(ModelVersion.stage).in_(stages)
        )
    ).all()
    return [(name, number) for name, number in rows]
