"""The embedded default stack (MLflow, Prefect, API, worker) as local processes under `home`."""

from stagegate.stack.secrets import (
    StackSecrets,
    effective_alert_secret,
    effective_webhook_secret,
    load_secrets,
)
from stagegate.stack.specs import default_specs, worker_ready_file
from stagegate.stack.supervisor import down, status, up
from stagegate.supervise import HealthCheck, ServiceSpec, ServiceStatus

__all__ = [
    "HealthCheck",
    "ServiceSpec",
    "ServiceStatus",
    "StackSecrets",
    "default_specs",
    "down",
    "effective_alert_secret",
    "effective_webhook_secret",
    "load_secrets",
    "status",
    "up",
    "worker_ready_file",
]
