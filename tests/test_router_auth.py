"""The router's admin paths (/policies, /metrics) need its bearer token; /health and traffic do not.

The fast tests drive the real `Router` ASGI app in process, in front of a real TCP model
server on the same event loop; the slow one runs `stagegate router` and converge against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from stagegate.errors import PermanentError
from stagegate.events.sink import MemorySink
from stagegate.serving.router.config import FilePolicySource
from stagegate.serving.router.server import Router
from stagegate.settings import Settings
from stagegate.stack import default_specs, effective_router_admin_token, load_secrets
from stagegate.steps.converge import DataPlane, converge
from tests.factories import Factory
from tests.fakes import FakeBackend, FakeRegistry
from tests.fixtures.router_process import router_process

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "router-admin-" + "x" * 32
ADMIN_PATHS = ("/policies", "/metrics")


async def _model_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A model server that answers every request `{"predictions": [1]}` (keep-alive)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            body = b'{"predictions": [1]}'
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _with_router(
    tmp_path: Path, admin_token: str | None, requests: list[tuple[str, str, dict[str, str]]]
) -> list[httpx.Response]:
    """Start a model server and a router (its policy file names the server), send `requests`
    (method, path, headers) in order, and return the answers."""
    server = await asyncio.start_server(_model_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    policy = tmp_path / "policy.json"
    champion = {"version": 1, "url": f"http://127.0.0.1:{port}"}
    policy.write_text(json.dumps({"policies": [{"model": "fraud", "champion": champion}]}))
    router = Router(FilePolicySource(str(policy)), admin_token=admin_token, poll_interval_s=60)
    await router.start()
    try:
        transport = httpx.ASGITransport(app=router)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return [
                await client.request(
                    method,
                    path,
                    headers=headers,
                    json={"inputs": [[1]]} if method == "POST" else None,
                )
                for method, path, headers in requests
            ]
    finally:
        await router.stop()
        server.close()
        await server.wait_closed()


def _run(
    tmp_path: Path, admin_token: str | None, *requests: tuple[str, str, dict[str, str]]
) -> Any:
    return asyncio.run(_with_router(tmp_path, admin_token, list(requests)))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing bearer token"),
        (_bearer("guess"), "wrong router admin token"),
        (_bearer(TOKEN[:-1]), "wrong router admin token"),  # a prefix is not the token
        (_bearer(TOKEN + "x"), "wrong router admin token"),
        ({"Authorization": f"Basic {TOKEN}"}, "wrong router admin token"),  # wrong scheme
        ({"Authorization": TOKEN}, "wrong router admin token"),  # no scheme at all
    ],
)
def test_admin_paths_refuse_a_missing_or_wrong_token_with_a_json_401(
    tmp_path: Path, headers: dict[str, str], reason: str
) -> None:
    answers = _run(tmp_path, TOKEN, *(("GET", path, headers) for path in ADMIN_PATHS))
    for path, answer in zip(ADMIN_PATHS, answers, strict=True):
        assert answer.status_code == 401, path
        assert answer.json() == {"detail": reason, "code": "unauthenticated"}
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert "fraud" not in answer.text  # nothing about what is served leaks


def test_the_right_token_opens_the_admin_paths_and_health_and_traffic_need_none(
    tmp_path: Path,
) -> None:
    policies, metrics, lower_case, health, invoked = _run(
        tmp_path,
        TOKEN,
        ("GET", "/policies", _bearer(TOKEN)),
        ("GET", "/metrics", _bearer(TOKEN)),
        ("GET", "/policies", {"Authorization": f"bearer {TOKEN}"}),  # schemes ignore case
        ("GET", "/health", {}),
        ("POST", "/models/fraud/invocations", {}),
    )
    assert policies.status_code == 200
    assert [p["model"] for p in policies.json()["policies"]] == ["fraud"]
    assert lower_case.status_code == 200
    assert metrics.status_code == 200
    families = {f.name for f in text_string_to_metric_families(metrics.text)}
    assert "stagegate_router_requests" in families
    assert health.status_code == 200
    assert health.json()["models"] == ["fraud"]  # probes need no token
    assert invoked.status_code == 200  # clients of the models need no admin token
    assert invoked.json() == {"predictions": [1]}
    assert invoked.headers["x-stagegate-version"] == "1"


def test_without_a_token_the_admin_paths_stay_open_and_an_empty_one_is_refused(
    tmp_path: Path,
) -> None:
    answers = _run(tmp_path, None, *(("GET", path, {}) for path in ADMIN_PATHS))
    assert [a.status_code for a in answers] == [200, 200]  # dev mode: see the CLI's warning
    with pytest.raises(ValueError, match="must not be empty"):
        Router(FilePolicySource(str(tmp_path / "policy.json")), admin_token="")


def test_settings_refuse_a_short_token_in_prod_and_an_empty_one_anywhere() -> None:
    prod = {
        "mode": "prod",
        "webhook": {"secret": "w" * 32},
        "db": {"url": "postgresql://db/stagegate"},
    }
    assert Settings(**prod, serving={"router_admin_token": TOKEN}).serving.router_admin_token
    with pytest.raises(ValueError, match="ROUTER_ADMIN_TOKEN needs at least 32 bytes"):
        Settings(**prod, serving={"router_admin_token": "short"})
    with pytest.raises(ValueError, match="at least 1 character"):
        Settings(serving={"router_admin_token": ""})


def test_the_stack_generates_one_token_for_the_router_and_the_worker_only(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    secrets = load_secrets(settings)
    token = secrets.router_admin_token
    assert token is not None
    assert len(token) >= 40
    assert load_secrets(settings).router_admin_token == token  # kept, not regenerated
    specs = {s.name: s for s in default_specs(settings, secrets)}
    assert specs["router"].env["STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN"] == token
    assert specs["worker"].env["STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN"] == token  # converge
    assert "STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN" not in specs["api"].env  # least privilege
    # A home made before the token existed gets one; a configured token wins over it.
    older = tmp_path / "old"
    older.mkdir()
    legacy = secrets.model_dump(exclude={"router_admin_token"})
    (older / "secrets.json").write_text(json.dumps(legacy))
    assert load_secrets(Settings(home=older)).router_admin_token not in (None, token)
    configured = Settings(home=tmp_path / "home", serving={"router_admin_token": TOKEN})
    assert effective_router_admin_token(configured, secrets) == TOKEN


# --- the real `stagegate router` process and converge ------------------------------------------


@pytest.fixture
def router_proc(live_api_url: str, factory: Factory, tmp_path: Path) -> Iterator[str]:
    """`stagegate router` with an admin token, polling the API as the embedded stack's does."""
    token = factory.token("router", "service")["Authorization"].removeprefix("Bearer ")
    admin = {"STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN": TOKEN}
    with router_process(live_api_url, token, tmp_path / "router.log", admin) as url:
        yield url


@pytest.mark.slow
def test_converge_sends_the_token_and_a_wrong_one_fails_at_once(
    engine: Engine, sink: MemorySink, router_proc: str
) -> None:
    from stagegate.steps.intake import intake
    from tests.test_converge import _no_report_gates, _walk_v1_to_production

    _no_report_gates(engine)
    reg = FakeRegistry()
    reg.add("fraud", 1)
    intake(engine, reg, sink, "fraud", 1)
    _walk_v1_to_production(engine, reg)
    assert httpx.get(f"{router_proc}/policies", trust_env=False).status_code == 401
    assert httpx.get(f"{router_proc}/metrics", trust_env=False).status_code == 401

    backend = FakeBackend()
    wrong = DataPlane(backend, router_url=router_proc, router_token="guess", reload_timeout_s=10)
    started = time.monotonic()
    with pytest.raises(PermanentError, match="refused its /policies"):
        converge(engine, sink, wrong, "fraud")
    assert time.monotonic() - started < 5  # not a 10 s wait for a reload that cannot be seen

    plane = DataPlane(backend, router_url=router_proc, router_token=TOKEN, reload_timeout_s=10)
    result = converge(engine, sink, plane, "fraud")
    served = httpx.get(f"{router_proc}/policies", headers=_bearer(TOKEN), trust_env=False)
    assert [(p["model"], p["generation"]) for p in served.json()["policies"]] == [
        ("fraud", result.generation)
    ]


@pytest.mark.slow
def test_the_router_refuses_to_start_without_a_token_in_prod(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"policies": []}))
    env = {k: v for k, v in os.environ.items() if k != "STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN"} | {
        "STAGEGATE_MODE": "prod",
        "STAGEGATE_WEBHOOK__SECRET": "w" * 32,
        "STAGEGATE_DB__URL": "postgresql://db/stagegate",
    }
    result = subprocess.run(
        [sys.executable, "-m", "stagegate.cli", "router", "--policy", str(policy), "--port", "1"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN" in result.stderr
