"""The FastAPI app factory: `uvicorn stagegate.api.app:create_app --factory`."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from stagegate import __version__
from stagegate.api import errors
from stagegate.api.deps import AppState
from stagegate.api.limits import RequestLimits
from stagegate.api.routers import (
    audit,
    cards,
    events,
    experiments,
    feedback,
    fleet,
    health,
    identities,
    me,
    models,
    monitoring,
    policy_changes,
    traffic,
    transitions,
)
from stagegate.db import make_engine
from stagegate.events.sink import EventSink, PrefectEventSink
from stagegate.governance.tokens import TokenCache
from stagegate.settings import Settings, get_settings
from stagegate.ui import UiApp

# Every router the app mounts; the authorization test walks exactly these.
ROUTERS = (
    health.router,
    models.router,
    transitions.router,
    audit.router,
    events.router,
    feedback.router,
    traffic.router,
    monitoring.router,
    experiments.router,
    identities.router,
    policy_changes.router,
    me.router,
    fleet.router,
    cards.router,
)


def create_app(
    settings: Settings | None = None, *, engine: Engine | None = None, sink: EventSink | None = None
) -> FastAPI:
    settings = settings or get_settings()
    engine = engine or make_engine(settings.database_url, echo=settings.db.echo)
    sink = sink or PrefectEventSink(settings.prefect.api_url)
    app = FastAPI(
        title="Stagegate governance API",
        version=__version__,
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.stagegate = AppState(
        settings=settings, engine=engine, sink=sink, tokens=TokenCache(settings.api.token_cache_s)
    )
    errors.install(app)
    app.add_middleware(
        RequestLimits,
        max_body_bytes=settings.api.max_body_bytes,
        max_json_depth=settings.api.max_json_depth,
        max_in_flight=settings.api.max_in_flight,
        queue_timeout_s=settings.api.queue_timeout_s,
    )
    for router in ROUTERS:
        app.include_router(router)
    # The web UI: static files under a mount, so no API route and nothing in the OpenAPI.
    app.mount("/ui", UiApp(settings), name="ui")
    logging.getLogger("stagegate").setLevel(logging.INFO)
    return app
