"""The embedded default stack (MLflow, Prefect, API, worker) as local processes under `home`."""

from stagegate.stack.secrets import StackSecrets, effective_webhook_secret, load_secrets
from stagegate.stack.specs import HealthCheck, ServiceSpec, default_specs, worker_ready_file
from stagegate.stack.supervisor import ServiceStatus, down, status, up

__all__ = [
    "HealthCheck",
    "ServiceSpec",
    "ServiceStatus",
    "StackSecrets",
    "default_specs",
    "down",
    "effective_webhook_secret",
    "load_secrets",
    "status",
    "up",
    "worker_ready_file",
]
