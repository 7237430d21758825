"""The live objects a process needs (engine, registry, event sink), built once from settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy.engine import Engine

from stagegate.db import make_engine
from stagegate.events.sink import EventSink, PrefectEventSink
from stagegate.registry.mlflow import MlflowRegistry
from stagegate.registry.protocol import ModelRegistry
from stagegate.serving.backends.local import LocalBackend
from stagegate.serving.backends.protocol import ServingBackend
from stagegate.settings import Settings, get_settings
from stagegate.steps import endpoint
from stagegate.steps.endpoint import EndpointState
from stagegate.steps.reconcile import ReconcileReport
from stagegate.steps.reconcile import reconcile as reconcile_step


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    registry: ModelRegistry
    sink: EventSink
    backend: ServingBackend


def build(settings: Settings) -> Runtime:
    return Runtime(
        settings=settings,
        engine=make_engine(settings.database_url, echo=settings.db.echo),
        registry=MlflowRegistry(settings.mlflow.tracking_uri),
        sink=PrefectEventSink(settings.prefect.api_url),
        backend=LocalBackend(settings.serving_root, tracking_uri=settings.mlflow.tracking_uri),
    )


@lru_cache(maxsize=1)
def current() -> Runtime:
    """The process-wide runtime (flow runs reuse one engine and connection pool)."""
    return build(get_settings())


def sync_endpoint(rt: Runtime, model: str) -> EndpointState:
    """Make `model`'s servers and route match the database (see `steps.endpoint`)."""
    return endpoint.sync_endpoint(
        rt.engine,
        rt.backend,
        rt.settings.router_file,
        model,
        router_url=rt.settings.serving.router_url,
        device=rt.settings.serving.device,
    )


def reconcile(rt: Runtime) -> ReconcileReport:
    """One full reconcile pass, data plane included (see `steps.reconcile`)."""
    return reconcile_step(
        rt.engine,
        rt.registry,
        rt.sink,
        stale_after_s=rt.settings.lifecycle.stale_transition_s,
        sync_endpoint=lambda model: sync_endpoint(rt, model),
        backend=rt.backend.name,
    )
