"""Policies: which gates apply to which transition. They are data, stored per model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stagegate.lifecycle.stages import ALLOWED_MOVES, Role, Stage


class ApprovalRule(BaseModel):
    """N approvals from the given roles, for moves from any of `from_stages` to `to_stages`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    from_stages: frozenset[Stage] = Field(description="Stages the version leaves.")
    to_stages: frozenset[Stage] = Field(description="Stages the version enters.")
    required: int = Field(ge=0, le=10, description="Approvals needed.")
    roles: frozenset[Role] = Field(description="Roles whose approvals count.")

    @field_validator("roles")
    @classmethod
    def _only_people_approve(cls, roles: frozenset[Role]) -> frozenset[Role]:
        if Role.service in roles or Role.viewer in roles:
            raise ValueError("only approver, admin or author roles may approve")
        return roles

    def covers(self, from_stage: Stage, to_stage: Stage) -> bool:
        return from_stage in self.from_stages and to_stage in self.to_stages


class TrafficSettings(BaseModel):
    """How the model's endpoint treats the shadow and canary stages once they are served."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    challenger_weight: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Share of assignment keys the canary gets."
    )
    shadow_fraction: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of requests mirrored to the shadow."
    )
    assignment_field: str | None = Field(
        default=None, description="JSON field with the assignment key when no header is sent."
    )


class ShadowCriteria(BaseModel):
    """When a shadow report passes: enough mirrored answers, close enough to the champion's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: bool = Field(default=True, description="shadow->canary needs a passed report.")
    min_comparisons: int = Field(default=200, ge=1, description="Mirrored requests compared.")
    min_agreement: float = Field(
        default=0.9, ge=0, le=1, description="Share of answers equal to the champion's."
    )
    max_error_rate: float = Field(default=0.01, ge=0, le=1, description="Shadow failures.")
    max_wait_s: float = Field(
        default=3600, gt=0, description="The shadow flow gives up (report failed) after this."
    )


class CanaryCriteria(BaseModel):
    """When a canary report passes (a policy threshold until sequential tests arrive)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required: bool = Field(default=True, description="canary->production needs a passed report.")
    min_requests: int = Field(default=200, ge=1, description="Requests the canary answered.")
    max_error_rate_delta: float = Field(
        default=0.01, ge=0, le=1, description="Canary error rate minus the champion's."
    )
    max_latency_ratio: float = Field(
        default=1.5, gt=0, description="Canary median latency over the champion's..."
    )
    min_latency_delta_ms: float = Field(
        default=5.0,
        ge=0,
        description="...counted only when the medians also differ by this much. The median, "
        "not p99: a canary's few hundred requests make p99 mostly noise.",
    )
    max_wait_s: float = Field(default=3600, gt=0, description="The canary flow gives up after.")


class Policy(BaseModel):
    """Gate settings for one model (or the default for all)."""

    model_config = ConfigDict(extra="forbid")

    approvals: list[ApprovalRule] = Field(description="First matching rule wins.")
    approval_ttl_days: int = Field(default=7, ge=1, le=365, description="Approvals expire.")
    primary_metric: str | None = Field(
        default=None,
        description="Run metric compared with the champion's before canary and production.",
    )
    higher_is_better: bool = Field(default=True, description="Direction of `primary_metric`.")
    require_lineage: bool = Field(
        default=True, description="Production needs a training run and at least one dataset."
    )
    traffic: TrafficSettings = Field(default_factory=TrafficSettings)
    shadow: ShadowCriteria = Field(default_factory=ShadowCriteria)
    canary: CanaryCriteria = Field(default_factory=CanaryCriteria)

    def approval_rule(self, from_stage: Stage, to_stage: Stage) -> ApprovalRule | None:
        return next((r for r in self.approvals if r.covers(from_stage, to_stage)), None)

    @field_validator("approvals")
    @classmethod
    def _covers_every_move(cls, rules: list[ApprovalRule]) -> list[ApprovalRule]:
        missing = [
            f"{a}->{b}"
            for a, targets in ALLOWED_MOVES.items()
            for b in targets
            if not any(r.covers(a, b) for r in rules)
        ]
        if missing:
            raise ValueError(f"no approval rule covers {', '.join(sorted(missing))}")
        return rules


PEOPLE = frozenset({Role.approver, Role.admin})


def default_policy() -> Policy:
    """The platform default; see docs/stages-and-gates.md."""
    everything = frozenset(Stage)
    return Policy(
        approvals=[
            ApprovalRule(
                from_stages=frozenset({Stage.canary}),
                to_stages=frozenset({Stage.production}),
                required=2,
                roles=frozenset({Role.approver}),
            ),
            ApprovalRule(
                from_stages=frozenset({Stage.candidate, Stage.shadow}),
                to_stages=frozenset({Stage.shadow, Stage.canary}),
                required=1,
                roles=PEOPLE,
            ),
            ApprovalRule(
                from_stages=frozenset({Stage.production}),
                to_stages=frozenset({Stage.retired}),
                required=1,
                roles=PEOPLE,
            ),
            ApprovalRule(
                from_stages=everything,
                to_stages=frozenset({Stage.rolled_back, Stage.rejected}),
                required=1,
                roles=PEOPLE,
            ),
        ],
    )
