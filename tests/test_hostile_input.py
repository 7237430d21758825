"""Hostile input gets a 4xx with a reason, before it costs anything: never a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from stagegate.api.app import ROUTERS
from stagegate.api.limits import json_depth_exceeds
from stagegate.api.strict import StrictRoute
from stagegate.events.sink import MemorySink
from stagegate.settings import Settings
from tests.factories import Factory
from tests.test_webhook import delivery


def test_an_oversized_body_is_refused_before_authentication(client: TestClient) -> None:
    """No token, a 2 MiB body: 413 from the limit, not 401 after reading it all."""
    r = client.post("/api/v1/transitions", content=b"x" * (2 << 20))
    assert r.status_code == 413
    assert r.json()["code"] == "too_large"


def test_a_lying_content_length_is_refused_from_the_header(client: TestClient) -> None:
    r = client.post("/api/v1/feedback", content=b"{}", headers={"content-length": str(10**12)})
    assert r.status_code == 413


def test_a_streamed_body_is_cut_off_at_the_limit(client: TestClient) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(64):
            yield b"y" * 65536  # 4 MiB in all, no Content-Length

    r = client.post("/api/v1/feedback", content=chunks())
    assert r.status_code == 413


def test_deep_json_is_refused_unparsed_even_when_signed(
    client: TestClient, settings: Settings, sink: MemorySink
) -> None:
    deep = b'{"entity":"model_version","action":"created","data":' + b"[" * 100_000
    raw, headers = delivery(settings, deep + b"]" * 100_000 + b"}")
    r = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert r.status_code in (413, 422)  # too deep, or too long: refused either way
    raw, headers = delivery(settings, b"[" * 40 + b"]" * 40)
    r = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert r.status_code == 422
    assert r.json()["code"] == "too_deep"
    assert sink.events == []


def test_depth_scan_ignores_brackets_in_strings() -> None:
    assert not json_depth_exceeds(json.dumps({"a": "[" * 100}).encode(), 4)
    assert json_depth_exceeds(b"[[[[[1]]]]]", 4)
    assert not json_depth_exceeds(b"[[[[1]]]]", 4)
    assert not json_depth_exceeds(json.dumps({"a": '\\"[[[[[['}).encode(), 3)


@pytest.mark.parametrize("version", ["1e999", "9223372036854775808", "-1", "0"])
def test_signed_webhook_with_an_absurd_version_is_422(
    client: TestClient, settings: Settings, sink: MemorySink, version: str
) -> None:
    body = b'{"entity":"model_version","action":"created","data":{"name":"a","version":%s}}' % (
        version.encode()
    )
    raw, headers = delivery(settings, body)
    r = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert r.status_code == 422, r.text
    assert sink.events == []


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/models/fraud/versions/9223372036854775808",
        "/api/v1/models/fraud/versions/2147483648/lineage",
        "/api/v1/models?offset=100000000000000000000",
        "/api/v1/transitions?offset=9223372036854775808",
        "/api/v1/audit?offset=99999999999999999999",
        "/api/v1/models/fraud/production?at=0001-01-01T00:00:00Z",
        "/api/v1/models/fraud/production?at=9999-12-31T23:59:59Z",
    ],
)
def test_numbers_and_instants_out_of_range_are_422(
    client: TestClient, factory: Factory, path: str
) -> None:
    factory.version("fraud", 1)
    r = client.get(path, headers=factory.token("vic", "viewer"))
    assert r.status_code == 422, r.text


def test_a_huge_version_in_a_body_is_422(client: TestClient, factory: Factory) -> None:
    body = {"model": "fraud", "version": 2**63, "to_stage": "shadow", "reason": "x"}
    r = client.post("/api/v1/transitions", json=body, headers=factory.token("erin", "author"))
    assert r.status_code == 422


def test_feedback_labels_are_capped(client: TestClient, factory: Factory) -> None:
    item = {"request_id": "r1", "model": "fraud", "label": "z" * 20_000}
    r = client.post("/api/v1/feedback", json=item, headers=factory.token("svc", "service"))
    assert r.status_code == 422
    assert "at most" in r.text


def test_limits_hold_on_a_real_server_too(live_api_url: str) -> None:
    """The same refusal over a real socket (uvicorn), where bodies arrive in chunks."""
    r = httpx.post(f"{live_api_url}/api/v1/feedback", content=b"x" * (3 << 20), trust_env=False)
    assert r.status_code == 413


# Found by the fuzzer (tests/test_fuzz_api.py); each was a 500 or an undeclared status.


def test_a_label_with_an_integer_beyond_64_bits_is_422(
    client: TestClient, factory: Factory
) -> None:
    """The inference log stores labels as orjson does, which refuses such integers."""
    item = {"request_id": "r1", "model": "fraud", "label": {"score": 2**64}}
    r = client.post("/api/v1/feedback", json=item, headers=factory.token("svc", "service"))
    assert r.status_code == 422, r.text
    assert "64 bits" in r.text


def test_a_body_that_is_not_utf8_is_422(client: TestClient, factory: Factory) -> None:
    r = client.post(
        "/api/v1/transitions",
        content=b'{"model": "\xff\xfe"}',
        headers={**factory.token("erin", "author"), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request"
    assert r.json()["detail"][0]["loc"] == ["body"]


def test_production_of_an_unknown_model_is_a_declared_404(
    client: TestClient, factory: Factory
) -> None:
    r = client.get("/api/v1/models/nope/production", headers=factory.token("vic", "viewer"))
    assert r.status_code == 404
    declared = client.get("/api/openapi.json").json()["paths"]
    assert "404" in declared["/api/v1/models/{name}/production"]["get"]["responses"]


def test_a_signed_delivery_with_an_absurd_timestamp_is_401(
    client: TestClient, settings: Settings, sink: MemorySink
) -> None:
    body = b'{"entity":"model_version","action":"created","data":{"name":"a","version":1}}'
    raw, headers = delivery(settings, body, ts=10**400)
    r = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert r.status_code == 401, r.text
    assert sink.events == []


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_json_beyond_rfc_8259_is_422_not_stored(
    client: TestClient, factory: Factory, number: str
) -> None:
    """Python's parser takes these; inf passed `gt=0`, was stored, then echoed as `null`."""
    admin = {**factory.token("root", "admin"), "content-type": "application/json"}
    policy = client.get("/api/v1/models/*/policy", headers=admin).json()
    body = json.dumps(policy).replace('"max_wait_s": 3600.0', f'"max_wait_s": {number}', 1)
    assert number in body
    r = client.put("/api/v1/models/*/policy", content=body, headers=admin)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["type"] == "json_invalid"
    assert client.get("/api/v1/models/*/policy", headers=admin).json() == policy
    label = '{"request_id": "r1", "model": "fraud", "label": ' + number + "}"
    r = client.post("/api/v1/feedback", content=label, headers=admin)
    assert r.status_code == 422, r.text


def test_every_route_parses_json_strictly() -> None:
    routes = [r for router in ROUTERS for r in router.routes if isinstance(r, APIRoute)]
    assert routes
    assert all(isinstance(r, StrictRoute) for r in routes)


@pytest.mark.parametrize(
    "path", ["/api/v1/models?ofset=50", "/api/v1/transitions?limit=1&=null", "/api/health?x=1"]
)
def test_an_unknown_query_parameter_is_422_naming_it(
    client: TestClient, factory: Factory, path: str
) -> None:
    """A typo such as `ofset` was ignored: the client read page one as if it were the next."""
    factory.version("fraud", 1)
    r = client.get(path, headers=factory.token("vic", "viewer"))
    assert r.status_code == 422, r.text
    issue = r.json()["detail"][0]
    assert issue["type"] == "extra_forbidden"
    assert issue["loc"][0] == "query"
    assert "unknown query parameter" in issue["msg"]


def test_a_single_valued_query_parameter_given_twice_is_422(
    client: TestClient, factory: Factory
) -> None:
    """Found by the fuzzer: of `?status=pending&status=applied` only the last counted."""
    r = client.get(
        "/api/v1/transitions?status=pending&status=applied", headers=factory.token("vic", "viewer")
    )
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["type"] == "multiple_values"
    assert r.json()["detail"][0]["loc"] == ["query", "status"]


def test_requests_beyond_the_in_flight_cap_wait_then_get_a_json_503() -> None:
    """A flood waits on the event loop instead of holding threads and connections; one that
    waits too long gets a 503 with Retry-After, in the API's JSON error shape."""
    import asyncio

    from stagegate.api.limits import RequestLimits

    release = asyncio.Event()
    served: list[str] = []

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        served.append(scope["path"])
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limits = RequestLimits(
        slow_app, max_body_bytes=1024, max_json_depth=8, max_in_flight=2, queue_timeout_s=0.2
    )

    async def call(path: str) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await limits({"type": "http", "path": path, "headers": []}, receive, send)
        return sent

    async def scenario() -> list[list[dict[str, Any]]]:
        first = [asyncio.create_task(call(f"/a{i}")) for i in range(2)]
        await asyncio.sleep(0.05)
        refused = await call("/b")  # waits 0.2 s for a slot, then gives up
        release.set()
        return [refused, *await asyncio.gather(*first), await call("/c")]

    refused, one, two, after = asyncio.run(scenario())
    start = refused[0]
    assert start["status"] == 503
    assert (b"retry-after", b"1") in start["headers"]
    assert json.loads(refused[1]["body"]) == {
        "detail": "the API is at capacity; retry",
        "code": "retryable",
    }
    assert [m["status"] for m in (one[0], two[0], after[0])] == [200, 200, 200]
    assert served == ["/a0", "/a1", "/c"]  # the refused request never reached the app
