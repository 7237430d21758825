"""Traffic policies: how a model's endpoint splits, mirrors and falls back.

The router polls them from the governance API (`GET /api/v1/traffic`, served from the
database) or, standalone, reads them from a JSON/YAML file.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator


class Arm(BaseModel):
    """One served version: where its model server listens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    url: HttpUrl = Field(description="Base URL of the model server, e.g. http://127.0.0.1:7001")


class TrafficPolicy(BaseModel):
    """The endpoint of one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=128)
    generation: int = Field(
        default=0,
        ge=0,
        description="The endpoint generation this policy carries out; converge waits for it.",
    )
    champion: Arm
    challenger: Arm | None = None
    challenger_weight: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Share of assignment buckets for the challenger."
    )
    shadow: Arm | None = None
    shadow_fraction: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Share of requests mirrored to the shadow."
    )
    assignment_field: str | None = Field(
        default=None,
        description="JSON field holding the assignment key when no x-stagegate-key header is sent.",
    )
    timeout_ms: float = Field(
        default=1000,
        gt=0,
        le=60_000,
        description="Per-request upstream timeout for champion/challenger.",
    )
    shadow_timeout_ms: float = Field(default=2000, gt=0, le=60_000)
    fallback_to_champion: bool = Field(
        default=True,
        description="Answer with the champion when the challenger errors or times out.",
    )

    @model_validator(mode="after")
    def _arms_match_weights(self) -> TrafficPolicy:
        if self.challenger is None and self.challenger_weight > 0:
            raise ValueError("challenger_weight > 0 needs a challenger")
        if self.shadow is None and self.shadow_fraction > 0:
            raise ValueError("shadow_fraction > 0 needs a shadow")
        return self


class RouterConfig(BaseModel):
    """Everything a router serves: one policy per model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policies: list[TrafficPolicy] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_models(self) -> RouterConfig:
        names = [p.model for p in self.policies]
        if len(names) != len(set(names)):
            raise ValueError("one policy per model")
        return self

    def by_model(self) -> dict[str, TrafficPolicy]:
        return {p.model: p for p in self.policies}
