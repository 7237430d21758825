"""The live objects a process needs (engine, registry, event sink), built once from settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from sqlalchemy.engine import Engine

from stagegate.db import make_engine
from stagegate.events.sink import EventSink, PrefectEventSink
from stagegate.registry.mlflow import MlflowRegistry
from stagegate.registry.protocol import ModelRegistry
from stagegate.settings import Settings, get_settings


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: Engine
    registry: ModelRegistry
    sink: EventSink


def build(settings: Settings) -> Runtime:
    return Runtime(
        settings=settings,
        engine=make_engine(settings.database_url, echo=settings.db.echo),
        registry=MlflowRegistry(settings.mlflow.tracking_uri),
        sink=PrefectEventSink(settings.prefect.api_url),
    )


@lru_cache(maxsize=1)
def current() -> Runtime:
    """The process-wide runtime (flow runs reuse one engine and connection pool)."""
    return build(get_settings())
