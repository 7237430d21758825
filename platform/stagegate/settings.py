"""Settings, read from the environment (`STAGEGATE_*`) lazily through `get_settings()`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from stagegate.lifecycle.serving_spec import ServingSpec

DEV_WEBHOOK_SECRET = "dev-webhook-secret-change-me"  # noqa: S105 - refused outside dev mode
MIN_SECRET_BYTES = 32
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def _plain_http_off_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "http" and (parts.hostname or "") not in _LOOPBACK


class DatabaseSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the governance database; default: SQLite under home.",
    )
    echo: bool = Field(default=False, description="Log every SQL statement.")


class MlflowSettings(BaseModel):
    tracking_uri: str = Field(
        default="http://127.0.0.1:5005", description="MLflow tracking and registry server."
    )
    port: int = Field(default=5005, description="Port of the embedded MLflow server.")


class PrefectSettings(BaseModel):
    api_url: str = Field(default="http://127.0.0.1:4205/api", description="Prefect server API URL.")
    port: int = Field(default=4205, description="Port of the embedded Prefect server.")
    runner_poll_s: float = Field(
        default=1.0,
        gt=0,
        description="How often `stagegate worker` polls for triggered runs. 0.25 saves about "
        "0.4 s per run, but on Prefect's SQLite the extra queries caused 503s under load.",
    )


class ApiSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="Address the governance API binds.")
    port: int = Field(default=8765, description="Port of the governance API.")
    public_url: str | None = Field(
        default=None, description="URL MLflow uses to reach the API; default from host/port."
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="Larger request bodies are refused (413) before anything reads them.",
    )
    max_json_depth: int = Field(
        default=32, ge=2, description="JSON bodies nested deeper are refused (422) unparsed."
    )
    max_in_flight: int = Field(
        default=12,
        ge=1,
        le=1000,
        description="Requests handled at once; keep it below the database pool (15 by "
        "default). More wait, without holding a thread or a connection.",
    )
    queue_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="A waiting request gets 503 after this long."
    )
    token_cache_s: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="How long a verified token is trusted without asking the database: a "
        "token revoked by another process (`stagegate token revoke`, another worker) is refused "
        "within this many seconds; expiry holds to the instant. 0 turns the cache off.",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=32,
        description="API processes (uvicorn --workers) in the embedded stack. Each has its own "
        "`max_in_flight` and database pool; the audit chain is ordered by the database's lock.",
    )

    @property
    def url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


class WebhookSettings(BaseModel):
    secret: str = Field(
        default=DEV_WEBHOOK_SECRET, description="HMAC secret shared with the MLflow webhook."
    )
    max_skew_s: int = Field(
        default=300, description="Deliveries whose timestamp is further off are refused."
    )


class LifecycleSettings(BaseModel):
    stale_transition_s: int = Field(
        default=60,
        description="Approved transitions not applied after this long are applied by reconcile.",
    )


class GovernanceSettings(BaseModel):
    min_approvals: int = Field(
        default=1,
        ge=0,
        le=10,
        description="The floor for approvals: a policy change that lowers any move's required "
        "approvals below this waits for a second admin's approval (docs/approvals-and-audit.md).",
    )


class ServingSettings(BaseModel):
    log_url: str | None = Field(
        default=None,
        description="fsspec URL of the inference log (Parquet); default: a folder under home.",
    )
    log_flush_rows: int = Field(
        default=1000, ge=1, description="The inference log writes when this many records wait..."
    )
    log_flush_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="...or this often; a crash loses at most the smaller of the two.",
    )
    log_features_flush_interval_s: float = Field(
        default=300,
        gt=0,
        le=3600,
        description="Decoded feature rows (what the drift monitor reads) wait at most this "
        "long for a file of 100,000 rows; the drift check sees traffic only once written.",
    )
    router_port: int = Field(default=8770, description="Port of the embedded traffic router.")
    router_admin_token: str | None = Field(
        default=None,
        min_length=1,
        description="Bearer token the router requires on /policies and /metrics (converge and "
        "Prometheus send it); the embedded stack generates one. None: open, dev mode only.",
    )
    device: str = Field(
        default="auto", description="Device for model servers: auto, cpu or cuda[:N]."
    )
    backend: Literal["local", "kubernetes"] = Field(
        default="local",
        description="Where model servers run: local processes, or Kubernetes (the "
        "`kubernetes` settings; docs/kubernetes.md).",
    )

    router_url: str = Field(
        default="",
        max_length=2000,
        description="Where converge and the demo reach the router; empty: the embedded one on "
        "127.0.0.1:router_port. In a cluster, the router's Service URL.",
    )

    @model_validator(mode="after")
    def _embedded_router(self) -> ServingSettings:
        if not self.router_url:
            self.router_url = f"http://127.0.0.1:{self.router_port}"
        return self


class AlertSettings(BaseModel):
    """Drift alert webhooks: the URL is in each model's policy; how to call it is here."""

    secret: str | None = Field(
        default=None,
        description="HMAC-SHA256 key of `X-Stagegate-Signature`; the embedded stack generates "
        "one. Alerts are not sent unsigned.",
    )
    allow_private_hosts: bool = Field(
        default=False,
        description="Allow alert URLs on private and loopback addresses (link-local and "
        "cloud metadata addresses stay refused).",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list, description="Host names allowed whatever they resolve to."
    )
    timeout_s: float = Field(default=5.0, gt=0, le=60, description="Per attempt.")
    attempts: int = Field(default=4, ge=1, le=10, description="Tries, with doubling backoff.")
    backoff_s: float = Field(default=0.5, ge=0, le=60, description="Wait before the 2nd try.")


class ReferenceSettings(BaseModel):
    """Where the drift monitor may read a version's reference data from (docs/monitoring.md)."""

    max_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="A larger reference is refused: 'no reference'."
    )
    allow_private_hosts: bool = Field(
        default=False,
        description="Allow http(s) dataset sources on private and loopback hosts.",
    )
    local_roots: list[Path] | None = Field(
        default=None,
        description="Local dataset sources must lie under one of these folders; None: any "
        "path (anyone who can write MLflow runs can then point the monitor at a local file).",
    )


class KubernetesSettings(BaseModel):
    """The Kubernetes serving backend (STAGEGATE_SERVING__BACKEND=kubernetes)."""

    namespace: str = Field(
        default="stagegate",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="Namespace of the model servers; Stagegate needs create, patch, get, "
        "list and delete there (docs/kubernetes.md lists the Role).",
    )
    image: str = Field(
        default="stagegate:latest",
        description="Model-server image when a model's policy names none; pin it by digest "
        "in production.",
    )
    tracking_secret: str = Field(
        default="stagegate-mlflow",
        description="Secret holding the MLflow tracking URI the model servers download from.",
    )
    tracking_secret_key: str = Field(
        default="tracking-uri", description="Key of the tracking URI in that Secret."
    )
    cluster_domain: str = Field(
        default="cluster.local", description="The cluster's DNS domain, for Service URLs."
    )
    service_account: str | None = Field(
        default=None, description="Service account of the model-server pods; None: default."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets for pulling the model-server image."
    )
    kubeconfig: Path | None = Field(
        default=None,
        description="kubeconfig file; None: the in-cluster service account, else ~/.kube/config.",
    )
    context: str | None = Field(default=None, description="kubeconfig context; None: current.")
    rollout_timeout_s: float = Field(
        default=300,
        gt=0,
        description="How long a deploy waits for the rollout before a retryable failure "
        "that names the pods' reasons.",
    )
    poll_s: float = Field(default=2.0, gt=0, description="How often a rollout is re-read.")
    serving_defaults: ServingSpec | None = Field(
        default=None,
        description="The cluster's serving spec (image, resources, GPUs, placement) for models "
        "whose policy leaves `serving` at its defaults (JSON, as in a policy).",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STAGEGATE_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(
        default=Path(".stagegate"), description="Folder that holds all embedded state."
    )
    mode: Literal["dev", "prod"] = Field(
        default="dev", description="`prod` refuses development defaults such as secrets."
    )
    db: DatabaseSettings = Field(default_factory=DatabaseSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    governance: GovernanceSettings = Field(default_factory=GovernanceSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    reference: ReferenceSettings = Field(default_factory=ReferenceSettings)

    @model_validator(mode="after")
    def _refuse_dev_defaults_in_prod(self) -> Settings:
        """Prod mode refuses what is only safe on one developer's machine, all at once."""
        if self.mode != "prod":
            return self
        problems = []
        if self.webhook.secret == DEV_WEBHOOK_SECRET:
            problems.append("STAGEGATE_WEBHOOK__SECRET must be set")
        elif len(self.webhook.secret.encode()) < MIN_SECRET_BYTES:
            problems.append(f"STAGEGATE_WEBHOOK__SECRET needs at least {MIN_SECRET_BYTES} bytes")
        token = self.serving.router_admin_token
        if token is not None and len(token.encode()) < MIN_SECRET_BYTES:
            problems.append(
                f"STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN needs at least {MIN_SECRET_BYTES} bytes"
            )
        if self.alerts.secret is not None and len(self.alerts.secret.encode()) < MIN_SECRET_BYTES:
            problems.append(f"STAGEGATE_ALERTS__SECRET needs at least {MIN_SECRET_BYTES} bytes")
        if self.database_url.startswith("sqlite"):
            problems.append(
                "STAGEGATE_DB__URL must name a server database (PostgreSQL), not SQLite"
            )
        for name, url in (
            ("STAGEGATE_API__PUBLIC_URL", self.api.url),
            ("STAGEGATE_MLFLOW__TRACKING_URI", self.mlflow.tracking_uri),
            ("STAGEGATE_PREFECT__API_URL", self.prefect.api_url),
        ):
            if _plain_http_off_loopback(url):
                problems.append(f"{name} uses plain http to a non-loopback host ({url})")
        if problems:
            raise ValueError("prod mode refuses: " + "; ".join(problems))
        return self

    @property
    def database_url(self) -> str:
        return self.db.url or f"sqlite:///{(self.home / 'governance.db').resolve()}"

    @property
    def inference_log_url(self) -> str:
        return self.serving.log_url or str((self.home / "inference-log").resolve())

    @property
    def serving_root(self) -> Path:
        """Pid files and logs of the local model servers."""
        return (self.home / "serving").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
