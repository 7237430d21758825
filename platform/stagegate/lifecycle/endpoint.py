"""A model's endpoint as the lifecycle wants it: which version plays which role, and the split.

This is the desired state. It follows from the stages (production -> champion, canary ->
challenger, shadow -> shadow) and the model's traffic policy, so it is derived in one place,
here, and stored with a generation number whenever it changes.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from stagegate.lifecycle.policy import TrafficSettings
from stagegate.lifecycle.stages import DEPLOYMENT_ROLE, DeploymentRole, Stage


class EndpointSpec(BaseModel):
    """The versions an endpoint serves, by role, and how traffic reaches them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arms: dict[DeploymentRole, int] = Field(
        default_factory=dict, description="Role -> version; a role without a version is absent."
    )
    digests: dict[int, str] = Field(
        default_factory=dict,
        description="Version -> the artifact digest it was approved with; servers check it.",
    )
    challenger_weight: float = Field(default=0.0, ge=0.0, le=1.0)
    shadow_fraction: float = Field(default=0.0, ge=0.0, le=1.0)
    assignment_field: str | None = None

    @property
    def routed(self) -> bool:
        """Only a champion answers clients: without one the endpoint has no route at all."""
        return DeploymentRole.champion in self.arms

    def versions(self) -> set[int]:
        return set(self.arms.values())


def desired_endpoint(
    stages: Mapping[int, Stage], digests: Mapping[int, str], traffic: TrafficSettings
) -> EndpointSpec:
    """The endpoint that the versions' stages and the model's traffic policy call for."""
    arms = {DEPLOYMENT_ROLE[s]: v for v, s in sorted(stages.items()) if s in DEPLOYMENT_ROLE}
    return EndpointSpec(
        arms=arms,
        digests={v: digests[v] for v in arms.values() if v in digests},
        challenger_weight=(traffic.challenger_weight if DeploymentRole.challenger in arms else 0.0),
        shadow_fraction=traffic.shadow_fraction if DeploymentRole.shadow in arms else 0.0,
        assignment_field=traffic.assignment_field,
    )
