"""Secrets the embedded stack generates once and keeps in `{home}/secrets.json` (mode 0600)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet
from pydantic import BaseModel, Field, ValidationError

from stagegate.errors import PermanentError
from stagegate.governance import tokens
from stagegate.settings import DEV_WEBHOOK_SECRET, Settings


class StackSecrets(BaseModel):
    webhook_secret: str = Field(description="HMAC secret shared by the MLflow webhook and the API.")
    mlflow_fernet_key: str = Field(
        description="Fernet key MLflow uses to encrypt webhook secrets at rest."
    )
    router_token: str | None = Field(
        default=None,
        description="The embedded router's API token (role service): it polls /api/v1/traffic.",
    )
    alert_secret: str | None = Field(
        default=None, description="HMAC secret that signs drift alerts (see docs/monitoring.md)."
    )
    router_admin_token: str | None = Field(
        default=None,
        description="Bearer token of the router's /policies and /metrics (docs/serving.md).",
    )


def secrets_file(settings: Settings) -> Path:
    return settings.home / "secrets.json"


def load_secrets(settings: Settings) -> StackSecrets:
    """Read the stack secrets, creating them on the first call (never overwritten after)."""
    path = secrets_file(settings)
    if not path.exists():
        _create(path)
    try:
        loaded = StackSecrets.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise PermanentError(f"cannot read stack secrets from {path}: {exc}") from exc
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    missing: dict[str, str] = {}  # a home made before these existed gets them now
    if loaded.router_token is None:
        missing["router_token"] = _router_token()
    if loaded.alert_secret is None:
        missing["alert_secret"] = secrets.token_urlsafe(32)
    if loaded.router_admin_token is None:
        missing["router_admin_token"] = secrets.token_urlsafe(32)
    if missing:
        loaded = loaded.model_copy(update=missing)
        _write(path, loaded, replace=True)
    return loaded


def _router_token() -> str:
    return tokens.PREFIX + secrets.token_urlsafe(32)


def _create(path: Path) -> None:
    fresh = StackSecrets(
        webhook_secret=secrets.token_urlsafe(32),
        mlflow_fernet_key=Fernet.generate_key().decode(),
        router_token=_router_token(),
        alert_secret=secrets.token_urlsafe(32),
        router_admin_token=secrets.token_urlsafe(32),
    )
    _write(path, fresh, replace=False)


def _write(path: Path, content: StackSecrets, *, replace: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(content.model_dump(), fh, indent=2)
        if replace:
            os.replace(tmp, path)
        else:
            # link() fails when another process created the file first: theirs wins.
            os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def effective_alert_secret(settings: Settings, secrets: StackSecrets) -> str | None:
    return settings.alerts.secret or secrets.alert_secret


def effective_router_admin_token(settings: Settings, secrets: StackSecrets) -> str | None:
    """An explicitly configured token wins over the generated one, so both sides agree."""
    return settings.serving.router_admin_token or secrets.router_admin_token


def effective_webhook_secret(settings: Settings, secrets: StackSecrets) -> str:
    """An explicitly configured secret wins over the generated one, so both sides agree."""
    if settings.webhook.secret != DEV_WEBHOOK_SECRET:
        return settings.webhook.secret
    return secrets.webhook_secret
