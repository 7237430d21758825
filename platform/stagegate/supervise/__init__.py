"""Detached, health-checked process groups with pid files: the embedded stack and local serving."""

from stagegate.supervise.spec import HealthCheck, ServiceSpec
from stagegate.supervise.supervisor import ServiceStatus, down, status, up

__all__ = ["HealthCheck", "ServiceSpec", "ServiceStatus", "down", "status", "up"]
