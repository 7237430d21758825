"""Intake: record a newly registered version with its lineage, and open candidate->shadow."""

from __future__ import annotations

from dataclasses import dataclass

from stagegate.db import Engine, transaction, utcnow
from stagegate.events.announce import announce_if_approved
from stagegate.events.sink import EventSink
from stagegate.governance import transitions, versions
from stagegate.governance.versions import DatasetInput, VersionRecord
from stagegate.lifecycle.stages import Stage
from stagegate.registry.protocol import ModelRegistry, RegistryVersion
from stagegate.steps.common import SERVICE


@dataclass(frozen=True)
class IntakeResult:
    model: str
    version: int
    recorded: bool  # False when an earlier run already recorded it
    transition_id: str | None
    digest: str


def to_record(
    rv: RegistryVersion, digest: str, reference_source: str | None = None
) -> VersionRecord:
    return VersionRecord(
        name=rv.name,
        version=rv.version,
        source=rv.source,
        run_id=rv.run_id,
        creator=rv.creator,
        registered_at=rv.created_at,
        digest=digest,
        code_commit=rv.code_commit,
        metrics=dict(rv.metrics),
        params=dict(rv.params),
        datasets=[DatasetInput(d.name, d.source, d.digest, d.context) for d in rv.datasets],
        depends_on=[(d.name, d.version) for d in rv.depends_on],
        reference_source=reference_source,
    )


def intake(
    engine: Engine, registry: ModelRegistry, sink: EventSink, name: str, version: int
) -> IntakeResult:
    """Idempotent: keyed by `intake:<name>:<version>`, a rerun finds what the first one did."""
    rv = registry.get_version(name, version)  # re-read: webhook bodies are not trusted
    digest = registry.artifact_digest(name, version)
    reference = registry.describe_reference(name, version)  # for the drift monitor's lineage
    with transaction(engine) as session:
        row, recorded = versions.record_version(
            session, to_record(rv, digest, reference), actor=SERVICE.name
        )
        transition = None
        if row.stage is Stage.candidate:
            transition, _ = transitions.request(
                session,
                principal=SERVICE,
                model=name,
                version=version,
                to_stage=Stage.shadow,
                reason="intake: new version registered",
                now=utcnow(),
                idempotency_key=f"intake:{name}:{version}",
            )
        stage = row.stage
    registry.mirror_stage(name, version, stage)
    if transition is not None:
        announce_if_approved(sink, transition)
    return IntakeResult(name, version, recorded, transition.id if transition else None, digest)
