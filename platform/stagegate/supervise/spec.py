"""What the supervisor needs to know about a service: how to start it, how to tell it is up."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class HealthCheck(BaseModel):
    """A service is healthy when its process lives and every check given here passes."""

    model_config = ConfigDict(frozen=True)

    url: str | None = Field(default=None, description="GET must answer 200.")
    ready_file: Path | None = Field(
        default=None, description="Must exist and be touched after the process started."
    )


class ServiceSpec(BaseModel):
    """How to start one service and how to tell it is up."""

    model_config = ConfigDict(frozen=True)

    name: str
    argv: list[str]
    env: dict[str, str] = Field(
        default_factory=dict, description="Set on top of the caller's environment."
    )
    health_check: HealthCheck = Field(default_factory=HealthCheck)
    depends_on: tuple[str, ...] = ()
    url: str | None = Field(default=None, description="Where users reach it, for `status`.")
    host: str = "127.0.0.1"
    port: int | None = Field(default=None, description="Checked free before starting.")
