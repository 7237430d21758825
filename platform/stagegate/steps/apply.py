"""Apply an approved transition: verify the artifact, move stages, mirror into the registry."""

from __future__ import annotations

from dataclasses import dataclass

from stagegate.db import Engine, transaction, utcnow
from stagegate.governance import transitions
from stagegate.governance.models import TransitionStatus
from stagegate.lifecycle.stages import Stage
from stagegate.registry.protocol import ModelRegistry
from stagegate.steps.common import SERVICE


@dataclass(frozen=True)
class ApplyResult:
    transition_id: str
    model: str
    version: int
    from_stage: Stage
    to_stage: Stage
    status: TransitionStatus
    reason: str | None
    mirrored: list[tuple[str, int, Stage]]


def apply_transition(
    engine: Engine, registry: ModelRegistry, transition_id: str, *, backend: str = "none"
) -> ApplyResult:
    """Idempotent, keyed by the transition id: a rerun re-mirrors and changes nothing else."""
    with transaction(engine) as session:
        t = transitions.get_transition(session, transition_id)
        name, number, status = t.model_name, t.version, t.status
        from_stage, to_stage = t.from_stage, t.to_stage
    # Hash the artifact outside any database transaction: it may take a while.
    digest = registry.artifact_digest(name, number) if status is TransitionStatus.approved else None
    with transaction(engine) as session:
        outcome = transitions.apply(
            session,
            transition_id=transition_id,
            actor=SERVICE.name,
            current_digest=digest,
            now=utcnow(),
            backend=backend,
        )
        result_status, reason = outcome.transition.status, outcome.transition.status_reason
        touched = (
            transitions.touched(session, transition_id)
            if result_status is TransitionStatus.applied
            else []
        )
    # The database is the truth; the registry mirror follows and is safe to repeat.
    for model, version, stage in touched:
        registry.mirror_stage(model, version, stage)
    return ApplyResult(
        transition_id, name, number, from_stage, to_stage, result_status, reason, touched
    )
