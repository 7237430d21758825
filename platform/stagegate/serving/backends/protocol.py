"""The serving-backend protocol: local processes today, Kubernetes at scale, same calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from stagegate.lifecycle.stages import DeploymentRole


@dataclass(frozen=True)
class ServedVersion:
    """A model version to serve, and the resources it asks for."""

    model: str
    version: int
    model_uri: str  # e.g. models:/fraud/3 (built by Stagegate, never taken from a request)
    role: DeploymentRole
    digest: str | None = None  # the approved artifact digest; the server refuses any other
    device: str = "auto"  # auto | cpu | cuda[:N]
    gpus: int = 0  # Kubernetes: nvidia.com/gpu request; local: informational
    node_selector: dict[str, str] = field(default_factory=dict)  # Kubernetes only
    max_batch_rows: int = 64
    max_wait_ms: float = 2.0

    @property
    def key(self) -> str:
        return f"{self.model}-v{self.version}"


@dataclass(frozen=True)
class DeploymentState:
    """What the backend observes about one served version."""

    key: str
    model: str
    version: int
    url: str | None
    running: bool
    healthy: bool
    detail: str = ""


class ServingBackend(Protocol):
    name: str

    def deploy(self, served: ServedVersion, *, timeout_s: float = 120) -> DeploymentState:
        """Start (or adopt) the version's server and wait until healthy. Idempotent."""
        ...

    def observe(self, model: str, version: int) -> DeploymentState | None:
        """The version's state, or None if it was never deployed (or was removed)."""
        ...

    def remove(self, model: str, version: int) -> bool:
        """Stop and forget the version's server; False if there was none. Idempotent."""
        ...

    def list(self) -> list[DeploymentState]: ...
