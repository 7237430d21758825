"""The embedded stack's services as data: `default_specs(settings, secrets)` builds them."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from stagegate.errors import PermanentError
from stagegate.settings import Settings
from stagegate.stack.secrets import (
    StackSecrets,
    effective_alert_secret,
    effective_router_admin_token,
    effective_webhook_secret,
)
from stagegate.supervise.spec import HealthCheck, ServiceSpec

SERVICE_NAMES = ("mlflow", "prefect", "api", "worker", "router")
# The folder that holds the `stagegate` package, for children when it is not installed.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def venv_bin() -> Path:
    """The bin folder of the running interpreter (not resolved: a venv's python is a link)."""
    return Path(sys.executable).parent


def worker_ready_file(settings: Settings) -> Path:
    """The file `stagegate worker` touches once it serves its deployments."""
    return settings.home.resolve() / "run" / "worker.ready"


def service_urls(settings: Settings) -> dict[str, str | None]:
    return {
        "mlflow": settings.mlflow.tracking_uri,
        "prefect": settings.prefect.api_url.removesuffix("/").removesuffix("/api"),
        "api": settings.api.url,
        "worker": None,
        "router": settings.serving.router_url,
    }


def settings_env(settings: Settings) -> dict[str, str]:
    """`STAGEGATE_*` variables that rebuild these exact settings in a child process."""
    env: dict[str, str] = {}
    for key, value in settings.model_dump(mode="json").items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, leaf in items:
            if leaf is None:
                continue
            name = f"STAGEGATE_{key}" if sub is None else f"STAGEGATE_{key}__{sub}"
            text = leaf if isinstance(leaf, str) else json.dumps(leaf)
            env[name.upper()] = text
    return env


def _path_env(extra: Mapping[str, str]) -> dict[str, str]:
    path = os.environ.get("PATH", "")
    no_proxy = ",".join(p for p in (os.environ.get("NO_PROXY"), "127.0.0.1,localhost") if p)
    return {
        "PATH": f"{venv_bin()}{os.pathsep}{path}" if path else str(venv_bin()),
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        **extra,
    }


def _flags(**options: object) -> list[str]:
    """`_flags(backend_store_uri=x)` -> `["--backend-store-uri", "x"]`."""
    argv: list[str] = []
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _check_port_matches(what: str, url: str, port: int) -> None:
    parts = urlsplit(url)
    if parts.hostname in _LOOPBACK and parts.port not in (None, port):
        raise PermanentError(
            f"{what} points at port {parts.port} but the embedded server listens on {port}: "
            "set both to the same port"
        )


def default_specs(settings: Settings, secrets: StackSecrets) -> list[ServiceSpec]:
    """mlflow and prefect (no dependencies), then api, then worker."""
    _check_port_matches("mlflow.tracking_uri", settings.mlflow.tracking_uri, settings.mlflow.port)
    _check_port_matches("prefect.api_url", settings.prefect.api_url, settings.prefect.port)
    home = settings.home.resolve()
    bin_dir = venv_bin()
    python = str(bin_dir / "python")
    urls = service_urls(settings)

    mlflow_dir = home / "mlflow"
    mlflow = ServiceSpec(
        name="mlflow",
        argv=[
            str(bin_dir / "mlflow"),
            "server",
            *_flags(
                host="127.0.0.1",
                port=settings.mlflow.port,
                workers=1,
                backend_store_uri=f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                artifacts_destination=mlflow_dir / "artifacts",
            ),
        ],
        env=_path_env(
            {
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
                "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": secrets.mlflow_fernet_key,
                "MLFLOW_WEBHOOK_CACHE_TTL": "1",
            }
        ),
        health_check=HealthCheck(url=f"{settings.mlflow.tracking_uri.rstrip('/')}/health"),
        url=urls["mlflow"],
        port=settings.mlflow.port,
    )

    prefect_home = home / "prefect"
    prefect_db = f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
    prefect = ServiceSpec(
        name="prefect",
        argv=[
            str(bin_dir / "prefect"),
            *("server", "start"),
            *_flags(host="127.0.0.1", port=settings.prefect.port),
        ],
        env=_path_env(
            {
                "PREFECT_HOME": str(prefect_home),
                "PREFECT_API_URL": settings.prefect.api_url,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": prefect_db,
                "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db,
                "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
            }
        ),
        health_check=HealthCheck(url=f"{settings.prefect.api_url.rstrip('/')}/health"),
        url=urls["prefect"],
        port=settings.prefect.port,
    )

    webhook_secret = effective_webhook_secret(settings, secrets)
    python_path = os.pathsep.join(p for p in (str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    app_env = _path_env(
        {
            **settings_env(settings),
            "STAGEGATE_HOME": str(home),
            "STAGEGATE_DB__URL": settings.database_url,
            "STAGEGATE_WEBHOOK__SECRET": webhook_secret,
            "STAGEGATE_ALERTS__SECRET": effective_alert_secret(settings, secrets) or "",
            "STAGEGATE_MLFLOW__TRACKING_URI": settings.mlflow.tracking_uri,
            "MLFLOW_TRACKING_URI": settings.mlflow.tracking_uri,
            # `registry.mlflow.HTTP_BOUNDS` (not imported: it imports mlflow), for every
            # process here, model servers included: MLflow's defaults let one call to a hung
            # server take about 20 minutes. Flows have their own retries.
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
            "PREFECT_API_URL": settings.prefect.api_url,
            "PREFECT_HOME": str(prefect_home),
            "PYTHONPATH": python_path,
        }
    )
    api = ServiceSpec(
        name="api",
        argv=[
            *(python, "-m", "uvicorn", "stagegate.api.app:create_app", "--factory"),
            *_flags(host=settings.api.host, port=settings.api.port),
            # Several processes share no memory: the in-flight cap, the pool and the token
            # cache are per process; the audit chain is ordered by the database's lock.
            *(_flags(workers=settings.api.workers) if settings.api.workers > 1 else ()),
        ],
        env=app_env,
        health_check=HealthCheck(url=f"{settings.api.url.rstrip('/')}/api/health"),
        depends_on=("mlflow", "prefect"),
        url=urls["api"],
        host=settings.api.host,
        port=settings.api.port,
    )

    # Only the router and the worker (converge) hold the router's admin token, not the API.
    admin_token = effective_router_admin_token(settings, secrets)
    admin_env = {"STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN": admin_token} if admin_token else {}
    console_script = bin_dir / "stagegate"
    worker_argv = (
        [str(console_script), "worker"]
        if console_script.exists()
        else [python, "-c", "from stagegate.cli import app; app()", "worker"]
    )
    worker = ServiceSpec(
        name="worker",
        argv=worker_argv,
        env={
            **app_env,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **admin_env,  # converge reads the router's /policies
        },
        health_check=HealthCheck(ready_file=worker_ready_file(settings)),
        depends_on=("api", "prefect"),
        url=urls["worker"],
    )
    # The router polls its policies from the API, as routers in any pod would; no shared file.
    traffic_url = f"{settings.api.url.rstrip('/')}/api/v1/traffic"
    router = ServiceSpec(
        name="router",
        argv=[
            *(python, "-m", "stagegate.cli", "router", "--policy", traffic_url),
            *("--log-dir", settings.inference_log_url),
            *_flags(host="127.0.0.1", port=settings.serving.router_port),
        ],
        env={**app_env, "STAGEGATE_ROUTER_TOKEN": secrets.router_token or "", **admin_env},
        health_check=HealthCheck(url=f"{settings.serving.router_url}/health"),
        depends_on=("api",),
        url=urls["router"],
        port=settings.serving.router_port,
    )
    return [mlflow, prefect, api, worker, router]
