"""SQLModel tables of the governance database. Schemas for the API live in `schemas.py`."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlalchemy import Enum as SAEnum
from sqlmodel import Field, SQLModel

from stagegate.db import UTCDateTime, utcnow
from stagegate.lifecycle.stages import DeploymentRole, Role, Stage


def _uuid() -> str:
    return uuid.uuid4().hex


def _json(default: Any = None) -> Any:
    return Field(
        default_factory=lambda: default() if callable(default) else default,
        sa_column=Column(JSON, nullable=False),
    )


def _enum(kind: type[StrEnum], default: Any = None, index: bool = False) -> Any:
    # VARCHAR, not a native enum type: new stages or roles then need no type migration.
    column: Column[Any] = Column(
        SAEnum(
            kind,
            native_enum=False,
            create_constraint=False,
            length=20,
            values_callable=lambda e: [m.value for m in e],
        ),
        nullable=False,
        index=index,
    )
    return Field(default=default, sa_column=column)


def _ts(nullable: bool = False, index: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_column=Column(UTCDateTime(), nullable=True, index=index))
    return Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime(), nullable=False, index=index)
    )


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_token"

    id: str = Field(default_factory=_uuid, primary_key=True)
    name: str = Field(index=True, max_length=100)  # the identity; one may hold several
    role: Role = _enum(Role)
    token_hash: str = Field(unique=True, max_length=64)
    created_at: datetime = _ts()
    revoked_at: datetime | None = _ts(nullable=True)
    expires_at: datetime | None = _ts(nullable=True)  # None: until revoked


class IdentityLink(SQLModel, table=True):
    """An MLflow user name and the identity (token holder) it belongs to: one identity per
    MLflow name, so a version's author maps to exactly one identity or to none."""

    __tablename__ = "identity_link"

    mlflow_user: str = Field(primary_key=True, max_length=200)
    identity: str = Field(index=True, max_length=100)
    linked_by: str = Field(max_length=100)
    linked_at: datetime = _ts()


class PolicyChangeStatus(StrEnum):
    applied = "applied"  # in force (at once, or once a second admin approved it)
    pending = "pending"  # weakens the policy: waits for a second admin
    rejected = "rejected"  # a second admin said no, or the proposer withdrew it


class PolicyChange(SQLModel, table=True):
    """Every change of a policy, and who proposed and approved it. A weakening change waits
    here as `pending` until another admin approves it (four eyes)."""

    __tablename__ = "policy_change"

    id: str = Field(default_factory=_uuid, primary_key=True)
    model_name: str = Field(index=True, max_length=128)  # `*`: the default policy
    body: dict[str, Any] = _json(dict)  # the proposed policy
    base: dict[str, Any] = _json(dict)  # the effective policy it was proposed against
    weakens: list[str] = _json(list)  # why it needs a second admin; empty: it did not
    status: PolicyChangeStatus = _enum(PolicyChangeStatus, PolicyChangeStatus.pending, index=True)
    # The model name while pending, else NULL: at most one pending change per model.
    pending_key: str | None = Field(default=None, unique=True, max_length=128)
    proposed_by: str = Field(max_length=100)
    proposed_at: datetime = _ts()
    decided_by: str | None = Field(default=None, max_length=100)
    decided_at: datetime | None = _ts(nullable=True)
    comment: str | None = Field(default=None, max_length=2000)


class RegisteredModel(SQLModel, table=True):
    __tablename__ = "registered_model"

    name: str = Field(primary_key=True, max_length=128)
    created_at: datetime = _ts()


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("model_name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(foreign_key="registered_model.name", index=True, max_length=128)
    version: int
    stage: Stage = _enum(Stage, Stage.candidate, index=True)
    run_id: str | None = Field(default=None, max_length=64)
    source: str = Field(max_length=2000)
    creator: str | None = Field(default=None, max_length=200)
    digest: str | None = Field(default=None, max_length=64)
    code_commit: str | None = Field(default=None, max_length=64)
    # Where the drift monitor reads the training frame from (None: nowhere), seen at intake.
    reference_source: str | None = Field(default=None, max_length=2000)
    metrics: dict[str, float] = _json(dict)
    params: dict[str, str] = _json(dict)
    registered_at: datetime = _ts()
    recorded_at: datetime = _ts()
    stage_changed_at: datetime = _ts()
    # The authenticated identity that attested authorship, and the artifact it attested: an
    # attestation counts only while `attested_digest` is still `digest` (governance/authorship.py).
    attested_by: str | None = Field(default=None, max_length=100)
    attested_at: datetime | None = _ts(nullable=True)
    attested_digest: str | None = Field(default=None, max_length=64)


class Dataset(SQLModel, table=True):
    __tablename__ = "dataset"
    __table_args__ = (UniqueConstraint("source", "digest"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=200)
    source: str = Field(max_length=2000)
    digest: str = Field(max_length=128)


class VersionDataset(SQLModel, table=True):
    __tablename__ = "version_dataset"

    version_id: int = Field(foreign_key="model_version.id", primary_key=True)
    dataset_id: int = Field(foreign_key="dataset.id", primary_key=True)
    context: str | None = Field(default=None, max_length=100)


class VersionDependency(SQLModel, table=True):
    """`version_id` consumes the upstream version (declared by the `stagegate.depends_on` tag)."""

    __tablename__ = "version_dependency"

    version_id: int = Field(foreign_key="model_version.id", primary_key=True)
    upstream_model: str = Field(primary_key=True, max_length=128)
    upstream_version: int = Field(primary_key=True)


class TransitionStatus(StrEnum):
    pending = "pending"  # waiting for gates
    approved = "approved"  # gates passed; waiting for the promote flow
    applied = "applied"  # the stage moved
    rejected = "rejected"  # an approver said no
    failed = "failed"  # could not be applied (the world moved, the digest changed)
    cancelled = "cancelled"  # superseded: the version left the stage it was requested from


OPEN_STATUSES = (TransitionStatus.pending, TransitionStatus.approved)


class Transition(SQLModel, table=True):
    __tablename__ = "transition"

    id: str = Field(default_factory=_uuid, primary_key=True)
    model_name: str = Field(foreign_key="registered_model.name", index=True, max_length=128)
    version: int
    from_stage: Stage = _enum(Stage)
    to_stage: Stage = _enum(Stage)
    reason: str = Field(max_length=2000)
    status: TransitionStatus = _enum(TransitionStatus, TransitionStatus.pending, index=True)
    requested_by: str = Field(max_length=100)
    idempotency_key: str | None = Field(default=None, unique=True, max_length=200)
    gate_results: list[dict[str, Any]] = _json(list)
    status_reason: str | None = Field(default=None, max_length=2000)
    created_at: datetime = _ts()
    decided_at: datetime | None = _ts(nullable=True)
    applied_at: datetime | None = _ts(nullable=True)
    # The endpoint generation its apply produced, and when `stagegate.transition.applied` went
    # out: converge announces an applied transition once routers serve that generation.
    generation: int | None = Field(default=None)
    announced_at: datetime | None = _ts(nullable=True)


class Approval(SQLModel, table=True):
    __tablename__ = "approval"
    __table_args__ = (UniqueConstraint("transition_id", "approver"),)

    id: str = Field(default_factory=_uuid, primary_key=True)
    transition_id: str = Field(foreign_key="transition.id", index=True)
    approver: str = Field(max_length=100)
    role: Role = _enum(Role)
    decision: str = Field(max_length=10)  # approve | reject
    comment: str | None = Field(default=None, max_length=2000)
    digest: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts()


class Deployment(SQLModel, table=True):
    """A version serving a role on a backend during [started_at, ended_at)."""

    __tablename__ = "deployment"

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(foreign_key="registered_model.name", index=True, max_length=128)
    version: int
    role: DeploymentRole = _enum(DeploymentRole)
    backend: str = Field(default="none", max_length=40)
    transition_id: str = Field(foreign_key="transition.id")
    started_at: datetime = _ts(index=True)
    ended_at: datetime | None = _ts(nullable=True)
    ended_by_transition_id: str | None = Field(default=None, foreign_key="transition.id")


class PolicyRecord(SQLModel, table=True):
    """Per-model gate policy; the row named `*` overrides the built-in default for all."""

    __tablename__ = "policy"

    model_name: str = Field(primary_key=True, max_length=128)
    body: dict[str, Any] = _json(dict)
    updated_at: datetime = _ts()
    updated_by: str = Field(max_length=100)


class WebhookDelivery(SQLModel, table=True):
    """Each registry webhook delivery id is processed once."""

    __tablename__ = "webhook_delivery"

    delivery_id: str = Field(primary_key=True, max_length=100)
    entity: str = Field(max_length=60)
    action: str = Field(max_length=60)
    received_at: datetime = _ts()


class AuditEntry(SQLModel, table=True):
    """Append-only and hash-chained: hash = sha256(prev_hash + canonical JSON of the row)."""

    __tablename__ = "audit_log"

    seq: int = Field(primary_key=True)
    at: datetime = _ts()
    actor: str = Field(max_length=100)
    action: str = Field(max_length=60, index=True)
    entity_type: str = Field(max_length=40)
    entity_id: str = Field(max_length=200, index=True)
    data: dict[str, Any] = _json(dict)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)


class AuditHead(SQLModel, table=True):
    """One row whose update serialises appenders on every database."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str = Field(default="0" * 64, max_length=64)


class Evaluation(SQLModel, table=True):
    """Evidence about a live version: a shadow report or a canary report.

    Bound to the artifact digest and to the champion it was compared with: a gate counts it
    only while both still hold. `evidence_key` makes recording the same evidence twice a
    no-op (a re-run flow, two flows racing)."""

    __tablename__ = "evaluation"

    id: int | None = Field(default=None, primary_key=True)
    evidence_key: str | None = Field(default=None, unique=True, max_length=400)
    digest: str | None = Field(default=None, max_length=64)
    champion_version: int | None = Field(default=None)
    window_end: datetime | None = _ts(nullable=True)
    model_name: str = Field(foreign_key="registered_model.name", index=True, max_length=128)
    version: int
    kind: str = Field(max_length=20)  # shadow | canary | experiment | drift
    passed: bool
    reason: str = Field(max_length=2000)
    sample_size: int
    summary: dict[str, Any] = _json(dict)
    window_start: datetime = _ts()
    created_at: datetime = _ts()


class ExperimentLook(SQLModel, table=True):
    """One look of a canary's A/B experiment: its samples, effect and interval, and what it
    decided. The series is the experiment's chart; the decision itself is an `Evaluation`."""

    __tablename__ = "experiment_look"
    __table_args__ = (Index("ix_experiment_look_version", "model_name", "version", "window_start"),)

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(foreign_key="registered_model.name", max_length=128)
    version: int
    digest: str | None = Field(default=None, max_length=64)
    champion_version: int | None = Field(default=None)
    window_start: datetime = _ts()  # when the canary started: one experiment per start
    at: datetime = _ts()
    action: str = Field(max_length=20)  # continue | promote | rollback
    n_treatment: int
    n_control: int
    estimate: float | None = None
    lower: float | None = None  # None: the interval is still unbounded
    upper: float | None = None
    detail: dict[str, Any] = _json(dict)  # means, p-value, guardrails, labels pending


class AlarmStatus(StrEnum):
    open = "open"
    acknowledged = "acknowledged"


class DriftAlarm(SQLModel, table=True):
    """A version's traffic drifted. One alarm per episode: while it is open, later drifting
    windows are attached to it (`last_evaluation_id`) and set off no new action. Each action
    records its own outcome here, so a re-run after a crash resumes where it stopped."""

    __tablename__ = "drift_alarm"

    id: str = Field(default_factory=_uuid, primary_key=True)
    model_name: str = Field(foreign_key="registered_model.name", index=True, max_length=128)
    version: int
    status: AlarmStatus = _enum(AlarmStatus, AlarmStatus.open, index=True)
    evaluation_id: int = Field(foreign_key="evaluation.id")
    last_evaluation_id: int = Field(foreign_key="evaluation.id")
    drifted_features: list[str] = _json(list)
    opened_at: datetime = _ts()
    alert_status: str | None = Field(default=None, max_length=20)  # delivered | failed | refused
    alert_attempts: int = 0
    rollback_transition_id: str | None = Field(default=None, max_length=32)
    event_emitted_at: datetime | None = _ts(nullable=True)
    acknowledged_by: str | None = Field(default=None, max_length=100)
    acknowledged_at: datetime | None = _ts(nullable=True)
    comment: str | None = Field(default=None, max_length=2000)


class Endpoint(SQLModel, table=True):
    """A model's endpoint: the desired state, and the route routers serve (see `endpoints.py`).

    `generation` counts every change routers must see: a new desired state (written with the
    stage move) or new server URLs (written by converge). `route` is the traffic policy of
    `route_generation`, with URLs; `converged_generation` is the last one routers served and
    whose leftover servers were removed.
    """

    __tablename__ = "endpoint"

    model_name: str = Field(primary_key=True, foreign_key="registered_model.name", max_length=128)
    generation: int = 0
    spec: dict[str, Any] = _json(dict)
    route: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    route_generation: int = 0
    converged_generation: int = 0
    updated_at: datetime = _ts()
