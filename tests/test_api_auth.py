"""Every route has an authorization dependency, and tokens and roles are enforced."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from stagegate.api.app import ROUTERS
from stagegate.api.routers.health import PUBLIC_PATHS
from tests.factories import Factory, auth


def _has_authz(dependant: Any) -> bool:
    return any(
        getattr(d.call, "__stagegate_authz__", False) or _has_authz(d)
        for d in dependant.dependencies
    )


def _routes() -> list[APIRoute]:
    return [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]


def test_every_route_has_an_authorization_dependency() -> None:
    unguarded = [
        f"{sorted(r.methods)} {r.path}"
        for r in _routes()
        if r.path not in PUBLIC_PATHS and not _has_authz(r.dependant)
    ]
    assert unguarded == []


def test_the_walk_sees_every_route_the_app_serves(client: TestClient) -> None:
    served = set(client.get("/api/openapi.json").json()["paths"])
    walked = {r.path for r in _routes()}
    assert served == walked
    assert len(walked) >= 10


def _sample_path(path: str) -> str:
    return (
        path.replace("{name}", "fraud").replace("{version}", "1").replace("{transition_id}", "abc")
    )


@pytest.mark.parametrize(
    "route",
    [r for r in _routes() if r.path not in PUBLIC_PATHS],
    ids=lambda r: f"{sorted(r.methods)[0]} {r.path}",
)
def test_no_token_is_401(client: TestClient, route: APIRoute) -> None:
    method = sorted(route.methods)[0]
    response = client.request(method, _sample_path(route.path), json={})
    assert response.status_code == 401, response.text
    assert response.json()["code"] in {"unauthenticated", "invalid_delivery"}


def test_invalid_and_revoked_tokens_are_401(client: TestClient, factory: Factory) -> None:
    assert client.get("/api/v1/models", headers=auth("sg_nope")).status_code == 401
    assert client.get("/api/v1/models", headers=auth("nonsense")).status_code == 401
    headers = factory.token("temp", "viewer")
    assert client.get("/api/v1/models", headers=headers).status_code == 200
    from stagegate.db import transaction
    from stagegate.governance import tokens

    with transaction(factory.engine) as s:
        tokens.revoke_token(s, name="temp")
    r = client.get("/api/v1/models", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("role", "method", "path", "body"),
    [
        (
            "viewer",
            "POST",
            "/api/v1/transitions",
            {"model": "fraud", "version": 1, "to_stage": "shadow", "reason": "x"},
        ),
        (
            "approver",
            "POST",
            "/api/v1/transitions",
            {"model": "fraud", "version": 1, "to_stage": "shadow", "reason": "x"},
        ),
        ("viewer", "POST", "/api/v1/transitions/abc/approvals", {"decision": "approve"}),
        ("service", "POST", "/api/v1/transitions/abc/approvals", {"decision": "approve"}),
        ("approver", "PUT", "/api/v1/models/fraud/policy", {}),
        ("author", "PUT", "/api/v1/models/fraud/policy", {}),
    ],
)
def test_wrong_role_is_403(
    client: TestClient, factory: Factory, role: str, method: str, path: str, body: dict[str, Any]
) -> None:
    headers = factory.token(f"someone-{role}", role)
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "permission_denied"


def test_health_is_public_and_says_nothing_else(client: TestClient) -> None:
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
