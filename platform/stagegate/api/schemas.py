"""Request and response bodies. Create models forbid extra fields (no mass assignment)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stagegate.api.limits import MAX_INT
from stagegate.governance.models import PolicyChangeStatus, TransitionStatus
from stagegate.lifecycle.endpoint import EndpointSpec
from stagegate.lifecycle.policy import Policy
from stagegate.lifecycle.stages import DeploymentRole, Role, Stage
from stagegate.serving.policy import TrafficPolicy

MAX_PAGE = 200


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TransitionCreate(Strict):
    model: str = Field(min_length=1, max_length=128, description="Registered model name.")
    version: int = Field(ge=1, le=MAX_INT, description="Model version number.")
    to_stage: Stage
    reason: str = Field(min_length=1, max_length=2000, description="Why; kept in the audit log.")


class ApprovalCreate(Strict):
    decision: Literal["approve", "reject"]
    comment: str | None = Field(default=None, max_length=2000)


class GateResultPublic(BaseModel):
    gate: str
    passed: bool
    reason: str


class ApprovalPublic(BaseModel):
    id: str
    transition_id: str
    approver: str
    role: Role
    decision: str
    comment: str | None
    digest: str | None
    created_at: datetime


class ActionPublic(BaseModel):
    """Whether the caller may take one decision now, and if not, why."""

    allowed: bool
    reason: str | None = Field(
        description="Why not, in the words the API would refuse with (null when allowed)."
    )


class AllowedActionsPublic(BaseModel):
    """What the caller may decide on a transition: the verdicts `decide` itself applies."""

    approve: ActionPublic
    reject: ActionPublic


class TransitionPublic(BaseModel):
    id: str
    model: str
    version: int
    from_stage: Stage
    to_stage: Stage
    reason: str
    status: TransitionStatus
    status_reason: str | None
    requested_by: str
    created_at: datetime
    decided_at: datetime | None
    applied_at: datetime | None
    gates: list[GateResultPublic]
    approvals: list[ApprovalPublic]
    allowed_actions: AllowedActionsPublic = Field(
        description="For the caller: may they approve or reject it now, and why not."
    )


class TransitionsPublic(BaseModel):
    data: list[TransitionPublic]
    offset: int
    limit: int


class DatasetPublic(BaseModel):
    name: str
    source: str
    digest: str
    context: str | None


class VersionRefPublic(BaseModel):
    model: str
    version: int
    stage: Stage | None = None


class VersionPublic(BaseModel):
    model: str
    version: int
    stage: Stage
    run_id: str | None
    source: str
    creator: str | None
    digest: str | None
    code_commit: str | None
    metrics: dict[str, float]
    params: dict[str, str]
    registered_at: datetime
    stage_changed_at: datetime
    datasets: list[DatasetPublic]
    depends_on: list[VersionRefPublic]
    reference_source: str | None = Field(
        default=None, description="Where the drift monitor reads the training frame from."
    )
    attested_by: str | None = Field(
        default=None,
        description="The authenticated identity that attested authorship of the version "
        "(an author of record: it may not approve the version's transitions).",
    )
    attested_at: datetime | None = Field(default=None, description="When it attested.")
    attested_digest: str | None = Field(
        default=None,
        description="The artifact it attested. When this is not `digest` the artifact changed "
        "since, and the attestation no longer counts.",
    )


class VersionSummary(BaseModel):
    version: int
    stage: Stage
    stage_changed_at: datetime


class ModelPublic(BaseModel):
    name: str
    created_at: datetime
    champion: int | None
    versions: list[VersionSummary]


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


class DeploymentPublic(BaseModel):
    version: int
    role: DeploymentRole
    backend: str
    transition_id: str
    started_at: datetime
    ended_at: datetime | None


class DriftLinkPublic(BaseModel):
    """One drift check of the version, as its lineage links it."""

    evaluation_id: int
    verdict: str
    window_start: datetime
    window_end: datetime | None
    drifted_features: list[str]
    report_url: str | None


class LineagePublic(BaseModel):
    version: VersionPublic
    transitions: list[TransitionPublic]
    deployments: list[DeploymentPublic]
    consumers: list[VersionRefPublic]
    drift: list[DriftLinkPublic] = Field(
        default_factory=list,
        description="Drift checks, newest first; details at .../drift, reports at report_url.",
    )


class ProductionPublic(BaseModel):
    model: str
    at: datetime
    version: int | None = Field(description="null when no version served production then")
    since: datetime | None = None
    until: datetime | None = None
    digest: str | None = None
    run_id: str | None = None
    transition: TransitionPublic | None = Field(
        default=None, description="The transition that approved this version into production."
    )
    window_opened_by: str | None = Field(
        default=None, description="Transition that started this window (a rollback restores)."
    )
    approved_by: list[ApprovalPublic] = Field(default_factory=list)
    datasets: list[DatasetPublic] = Field(default_factory=list)


class AuditEntryPublic(BaseModel):
    seq: int
    at: datetime
    actor: str
    action: str
    entity_type: str
    entity_id: str
    data: dict[str, Any]
    hash: str


class AuditPublic(BaseModel):
    data: list[AuditEntryPublic]
    offset: int
    limit: int


class AuditVerifyPublic(BaseModel):
    ok: bool
    rows: int
    first_bad_seq: int | None
    reason: str | None
    head_hash: str


class WebhookAccepted(BaseModel):
    delivery_id: str
    event: str
    emitted: bool


class FieldErrorPublic(BaseModel):
    """One reason a request failed validation, as FastAPI locates it."""

    loc: list[str | int] = Field(description='Where: `["body", "version"]`, `["query", "offset"]`.')
    msg: str
    type: str


class ErrorPublic(BaseModel):
    """The body of every error answer: a reason and a stable code, never a traceback."""

    detail: str | list[FieldErrorPublic] = Field(
        description="What went wrong: a sentence, or one entry per invalid field (422)."
    )
    code: str = Field(
        description="Stable for clients: `unauthenticated`, `invalid_delivery`, "
        "`permission_denied`, `not_found`, `conflict`, `transition_rejected`, `invalid_input`, "
        "`invalid_request`, `too_large`, `too_deep`, `retryable`."
    )


class EvaluationPublic(BaseModel):
    id: int
    model: str
    version: int
    kind: str
    passed: bool
    reason: str
    sample_size: int
    summary: dict[str, Any]
    window_start: datetime
    created_at: datetime


class EndpointPublic(BaseModel):
    """A model's endpoint: what the lifecycle wants served, and how far serving got."""

    model: str
    generation: int = Field(description="Counts every change routers must see.")
    spec: EndpointSpec = Field(description="The desired state: role -> version, and the split.")
    route: TrafficPolicy | None = Field(description="What routers serve (None: no route).")
    route_generation: int
    converged_generation: int = Field(
        description="The last generation a router served and whose leftover servers were removed."
    )
    converged: bool
    updated_at: datetime


class IdentityPublic(BaseModel):
    """A token holder and the MLflow user names linked to it (never a token)."""

    name: str
    role: Role
    active: bool = Field(description="A live (unrevoked, unexpired) token authenticates it.")
    mlflow_users: list[str] = Field(description="MLflow authors that are this identity.")


class IdentitiesPublic(BaseModel):
    data: list[IdentityPublic]


class PolicyChangePublic(BaseModel):
    """A policy change: applied at once, or pending a second admin because it weakens."""

    id: str
    model: str = Field(description="The model, or `*` for the default policy.")
    status: PolicyChangeStatus
    policy: Policy
    weakens: list[str] = Field(description="Why it needs a second admin; empty if it does not.")
    proposed_by: str
    proposed_at: datetime
    decided_by: str | None = None
    decided_at: datetime | None = None
    comment: str | None = None


class PolicyChangesPublic(BaseModel):
    data: list[PolicyChangePublic]
    offset: int
    limit: int


class MePublic(BaseModel):
    """The caller, as the API sees them."""

    name: str = Field(description="The identity approvals and audit rows record.")
    role: Role
    mlflow_users: list[str] = Field(description="MLflow user names an admin linked to it.")
    expires_at: datetime | None = Field(
        description="When the token of this call expires; null: until revoked."
    )


class HolderPublic(BaseModel):
    version: int
    since: datetime = Field(description="When the version entered its stage.")


class TrafficPublic(BaseModel):
    """The split the endpoint's desired state asks routers for (0 without the role)."""

    challenger_weight: float
    shadow_fraction: float


class DriftStatusPublic(BaseModel):
    status: Literal["ok", "drift", "unchecked"] = Field(
        description="`drift`: an alarm is open; `ok`: checked, none open; `unchecked`: never."
    )
    open_alarms: int
    last_checked: datetime | None


class FleetModelPublic(BaseModel):
    name: str
    versions: int
    champion: HolderPublic | None
    challenger: HolderPublic | None
    shadow: HolderPublic | None
    traffic: TrafficPublic
    pending_approvals: int = Field(description="Pending transitions of the model.")
    drift: DriftStatusPublic


class LeadTimePublic(BaseModel):
    """Registration to first production, per version that reached production."""

    median: float | None = Field(description="Seconds; null without samples.")
    p90: float | None = Field(description="Seconds; null without samples.")
    samples: int


class ReasonCountPublic(BaseModel):
    reason: str
    count: int


class RejectedPublic(BaseModel):
    share: float | None = Field(description="Rejected versions / registered versions.")
    versions: int = Field(description="Versions rejected at least once.")
    reasons: list[ReasonCountPublic] = Field(description="Most frequent first (at most 20).")


class FleetPublic(BaseModel):
    models: list[FleetModelPublic]
    pending_approvals: int
    lead_time_s: LeadTimePublic
    rejected: RejectedPublic


class DeploymentWindowPublic(BaseModel):
    """One window in which the version served a role, oldest first."""

    role: DeploymentRole
    started_at: datetime
    ended_at: datetime | None
    digest: str | None = Field(description="The artifact digest approved for this window.")
    transition_id: str | None = Field(description="The transition that opened the window.")


class CardLineagePublic(BaseModel):
    run_id: str | None
    source: str
    creator: str | None
    code_commit: str | None
    registered_at: datetime
    metrics: dict[str, float]
    params: dict[str, str]
    datasets: list[DatasetPublic]
    depends_on: list[VersionRefPublic]
    reference_source: str | None


class CardApprovalPublic(BaseModel):
    transition_id: str
    from_stage: Stage
    to_stage: Stage
    approver: str
    role: Role
    decision: str
    comment: str | None
    digest: str | None
    created_at: datetime


class CardEvidencePublic(BaseModel):
    id: int
    kind: str
    passed: bool
    reason: str
    sample_size: int
    digest: str | None
    champion_version: int | None
    window_start: datetime
    window_end: datetime | None
    created_at: datetime
    summary: dict[str, Any]


class CardPublic(BaseModel):
    """A model card: what the version is, what it was trained on, who let it through on what
    evidence, and when it served production."""

    model: str
    version: int
    stage: Stage
    digest: str | None
    lineage: CardLineagePublic
    approvals: list[CardApprovalPublic]
    evidence: list[CardEvidencePublic] = Field(description="Evaluations, oldest first.")
    production_history: list[DeploymentWindowPublic] = Field(
        description="The windows in which the version was the champion, oldest first."
    )
    generated_at: datetime
