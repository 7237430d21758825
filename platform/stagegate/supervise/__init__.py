"""Detached, health-checked process groups with pid files, and a watchdog that restarts them."""

from stagegate.supervise.spec import HealthCheck, ServiceSpec
from stagegate.supervise.supervisor import WATCHDOG, ServiceStatus, down, status, up
from stagegate.supervise.watchdog import WatchPolicy, watch, watchdog_status

__all__ = [
    "WATCHDOG",
    "HealthCheck",
    "ServiceSpec",
    "ServiceStatus",
    "WatchPolicy",
    "down",
    "status",
    "up",
    "watch",
    "watchdog_status",
]
