"""The live objects a process needs (engine, registry, event sink), built once from settings."""

from __future__ import annotations

from functools import cached_property, lru_cache

from sqlalchemy.engine import Engine

from stagegate.db import make_engine
from stagegate.events.sink import EventSink, PrefectEventSink
from stagegate.registry.protocol import ModelRegistry
from stagegate.serving.backends.local import LocalBackend
from stagegate.serving.backends.protocol import ServingBackend
from stagegate.settings import Settings, get_settings
from stagegate.steps import endpoint
from stagegate.steps.endpoint import EndpointState
from stagegate.steps.reconcile import ReconcileReport
from stagegate.steps.reconcile import reconcile as reconcile_step


class Runtime:
    """Built once per process; the registry is made on first use, because importing mlflow
    costs about 3 s and the shadow/canary flow runs never touch it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine = make_engine(settings.database_url, echo=settings.db.echo)
        self.sink: EventSink = PrefectEventSink(settings.prefect.api_url)
        self.backend: ServingBackend = LocalBackend(
            settings.serving_root, tracking_uri=settings.mlflow.tracking_uri
        )

    @cached_property
    def registry(self) -> ModelRegistry:
        from stagegate.registry.mlflow import MlflowRegistry

        return MlflowRegistry(self.settings.mlflow.tracking_uri)


def build(settings: Settings) -> Runtime:
    return Runtime(settings)


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
