"""Bring up the embedded stack: migrate, start and watch the services, register the webhook."""

from __future__ import annotations

import time
from collections.abc import Callable

from stagegate import stack
from stagegate.db import make_engine, transaction
from stagegate.governance import tokens
from stagegate.lifecycle.stages import Role
from stagegate.migrate import upgrade
from stagegate.registry.mlflow import MlflowRegistry
from stagegate.settings import Settings

WEBHOOK_EVENTS = ["model_version.created"]
WEBHOOK_PATH = "/api/v1/events/mlflow"
ROUTER_IDENTITY = "stagegate-router"  # the embedded router's token: it polls /api/v1/traffic


def start(
    settings: Settings, *, on_event: Callable[[str], None] = lambda _: None, timeout_s: float = 180
) -> dict[str, stack.ServiceStatus]:
    """Idempotent: services already running are left alone; the webhook is updated in place."""
    started = time.monotonic()
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    _register_router_token(settings)
    statuses = stack.up(settings, on_event=on_event, timeout_s=timeout_s)
    stack.watch(settings, on_event=on_event)  # restarts a service that crashes from now on
    secret = stack.effective_webhook_secret(settings, stack.load_secrets(settings))
    hook = MlflowRegistry(settings.mlflow.tracking_uri).ensure_webhook(
        settings.api.url + WEBHOOK_PATH, secret, WEBHOOK_EVENTS
    )
    on_event(f"webhook {hook} -> {settings.api.url}{WEBHOOK_PATH}")
    on_event(f"stack ready in {time.monotonic() - started:.1f} s")
    return statuses


def register_webhook(settings: Settings, secret: str) -> str:
    """Point the registry's `stagegate` webhook at this API (create or update it)."""
    hook = MlflowRegistry(settings.mlflow.tracking_uri).ensure_webhook(
        settings.api.url + WEBHOOK_PATH, secret, WEBHOOK_EVENTS
    )
    return f"webhook {hook} -> {settings.api.url}{WEBHOOK_PATH}"


def _register_router_token(settings: Settings) -> None:
    secret = stack.load_secrets(settings).router_token
    assert secret is not None  # load_secrets fills it in
    engine = make_engine(settings.database_url)
    try:
        with transaction(engine) as session:
            tokens.ensure_token(
                session, name=ROUTER_IDENTITY, role=Role.service, secret=secret, actor="stagegate"
            )
    finally:
        engine.dispose()
