"""The embedded default stack (MLflow, Prefect, API, worker, router) under `home`, watched."""

from stagegate.stack.secrets import (
    StackSecrets,
    effective_alert_secret,
    effective_router_admin_token,
    effective_webhook_secret,
    load_secrets,
)
from stagegate.stack.specs import default_specs, worker_ready_file
from stagegate.stack.supervisor import down, status, up, watch, watchdog_status
from stagegate.supervise import HealthCheck, ServiceSpec, ServiceStatus, WatchPolicy

__all__ = [
    "HealthCheck",
    "ServiceSpec",
    "ServiceStatus",
    "StackSecrets",
    "WatchPolicy",
    "default_specs",
    "down",
    "effective_alert_secret",
    "effective_router_admin_token",
    "effective_webhook_secret",
    "load_secrets",
    "status",
    "up",
    "watch",
    "watchdog_status",
    "worker_ready_file",
]
