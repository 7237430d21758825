"""Routers take their policies from the governance API (ETag polling), served from the database."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from stagegate.db import transaction
from stagegate.governance import endpoints
from stagegate.serving.policy import Arm, TrafficPolicy
from stagegate.serving.router.config import RejectedPolicy, UrlPolicySource
from tests.factories import Factory

POLICY = TrafficPolicy(model="fraud", champion=Arm(version=3, url="http://127.0.0.1:7001"))


def publish(engine: Engine, factory: Factory, policy: TrafficPolicy | None) -> int:
    """Publish a route for `fraud` as converge does; returns its generation."""
    with transaction(engine) as s:
        known = endpoints.find_endpoint(s, "fraud") is not None
    if not known:
        factory.version("fraud", 3)
    with transaction(engine) as s:
        state = endpoints.desire(s, "fraud", actor="test")
        route = None if policy is None else policy.model_dump(mode="json")
        return endpoints.publish_route(
            s, "fraud", generation=state.generation, route=route, actor="test"
        )


def test_traffic_endpoint_serves_the_published_routes_with_an_etag(
    client: TestClient, factory: Factory, engine: Engine
) -> None:
    service = factory.token("router", "service")
    empty = client.get("/api/v1/traffic", headers=service)
    assert empty.status_code == 200
    assert empty.json() == {"policies": []}
    generation = publish(engine, factory, POLICY)
    full = client.get("/api/v1/traffic", headers=service)
    assert full.json()["policies"][0]["champion"]["version"] == 3
    assert full.json()["policies"][0]["generation"] == generation
    assert full.headers["etag"] != empty.headers["etag"]
    same = client.get("/api/v1/traffic", headers={**service, "if-none-match": full.headers["etag"]})
    assert same.status_code == 304
    assert client.get("/api/v1/traffic", headers=factory.token("vic", "viewer")).status_code == 403
    assert client.get("/api/v1/traffic").status_code == 401


def test_url_source_fetches_then_gets_304(
    live_api_url: str, factory: Factory, engine: Engine
) -> None:
    publish(engine, factory, POLICY)
    token = factory.token("router", "service")["Authorization"].removeprefix("Bearer ")
    source = UrlPolicySource(f"{live_api_url}/api/v1/traffic", token=token)
    first = asyncio.run(source.fetch(None))
    assert first is not None
    etag, config = first
    assert config.by_model()["fraud"].champion.version == 3
    assert asyncio.run(source.fetch(etag)) is None  # unchanged: 304, nothing to parse
    publish(engine, factory, None)
    changed = asyncio.run(source.fetch(etag))
    assert changed is not None
    assert changed[1].policies == []
    with pytest.raises(RejectedPolicy, match="401"):
        asyncio.run(UrlPolicySource(f"{live_api_url}/api/v1/traffic", token="sg_wrong").fetch(None))
