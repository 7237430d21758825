"""The MLflow webhook receiver: signatures, timestamps, replays, and nothing recorded on failure."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stagegate.errors import RetryableError
from stagegate.events.signature import sign
from stagegate.events.sink import MemorySink, OutEvent
from stagegate.settings import Settings
from tests.factories import Factory


def delivery(
    settings: Settings,
    body: dict[str, Any] | bytes,
    *,
    secret: str | None = None,
    ts: int | None = None,
    delivery_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    did = delivery_id or str(uuid.uuid4())
    stamp = int(time.time()) if ts is None else ts
    sig = sign(secret or settings.webhook.secret, did, stamp, raw)
    return raw, {
        "x-mlflow-delivery-id": did,
        "x-mlflow-timestamp": str(stamp),
        "x-mlflow-signature": sig,
        "content-type": "application/json",
    }


CREATED = {
    "entity": "model_version",
    "action": "created",
    "timestamp": 1,
    "data": {
        "name": "fraud",
        "version": "3",
        "source": "s3://evil/elsewhere",
        "run_id": None,
        "tags": {},
        "description": None,
    },
}


def audit_rows(client: TestClient, headers: dict[str, str]) -> int:
    return len(client.get("/api/v1/audit?limit=200", headers=headers).json()["data"])


def test_verified_delivery_becomes_a_prefect_event(
    client: TestClient, settings: Settings, sink: MemorySink
) -> None:
    raw, headers = delivery(settings, CREATED)
    r = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["event"] == "mlflow.model_version.created"
    [event] = sink.events
    assert event.event == "mlflow.model_version.created"
    assert event.resource["prefect.resource.id"] == "stagegate.model.fraud.3"
    assert event.resource["stagegate.model.version"] == "3"
    # nothing from the body beyond name and version travels on (no URIs to fetch)
    assert "s3://" not in json.dumps(event.as_json())


def test_replayed_delivery_is_409_and_emits_once(
    client: TestClient, settings: Settings, sink: MemorySink
) -> None:
    raw, headers = delivery(settings, CREATED)
    assert client.post("/api/v1/events/mlflow", content=raw, headers=headers).status_code == 202
    again = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert again.status_code == 409
    assert len(sink.events) == 1


@pytest.mark.parametrize(
    "case",
    [
        "wrong_secret",
        "stale",
        "future",
        "tampered",
        "no_headers",
        "bad_timestamp",
        "unsigned_prefix",
    ],
)
def test_bad_deliveries_are_401_and_record_nothing(
    client: TestClient, settings: Settings, sink: MemorySink, factory: Factory, case: str
) -> None:
    viewer = factory.token("vic", "viewer")
    before = audit_rows(client, viewer)
    raw, headers = delivery(settings, CREATED)
    if case == "wrong_secret":
        raw, headers = delivery(settings, CREATED, secret="guess")
    elif case == "stale":
        raw, headers = delivery(settings, CREATED, ts=int(time.time()) - 301)
    elif case == "future":
        raw, headers = delivery(settings, CREATED, ts=int(time.time()) + 301)
    elif case == "tampered":
        raw = raw.replace(b"fraud", b"fraue")
    elif case == "no_headers":
        headers = {"content-type": "application/json"}
    elif case == "bad_timestamp":
        headers["x-mlflow-timestamp"] = "yesterday"
    elif case == "unsigned_prefix":
        headers["x-mlflow-signature"] = headers["x-mlflow-signature"].removeprefix("v1,")
    r = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert r.status_code == 401, r.text
    assert r.json()["code"] == "invalid_delivery"
    assert sink.events == []
    assert audit_rows(client, viewer) == before


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        json.dumps({"entity": "model_version", "action": "created"}).encode(),
        json.dumps(
            {"entity": "model version!", "action": "created", "data": {"name": "a"}}
        ).encode(),
        json.dumps({"entity": "model_version", "action": "created", "data": {}}).encode(),
        json.dumps(
            {
                "entity": "model_version",
                "action": "created",
                "data": {"name": "../etc", "version": "1"},
            }
        ).encode(),
        json.dumps(
            {"entity": "model_version", "action": "created", "data": {"name": "a", "version": "x"}}
        ).encode(),
    ],
)
def test_signed_but_malformed_bodies_are_422(
    client: TestClient, settings: Settings, sink: MemorySink, body: bytes
) -> None:
    raw, headers = delivery(settings, body)
    r = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert r.status_code == 422, r.text
    assert sink.events == []


class DownSink:
    def emit(self, event: OutEvent) -> None:
        raise RetryableError("Prefect unreachable")


def test_prefect_down_is_503_and_the_delivery_can_be_retried(
    client: TestClient, settings: Settings, sink: MemorySink
) -> None:
    state = client.app.state.stagegate  # type: ignore[attr-defined]
    state.sink = DownSink()
    raw, headers = delivery(settings, CREATED)
    r = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert r.status_code == 503
    assert r.headers["retry-after"]
    state.sink = sink
    retry = client.post("/api/v1/events/mlflow", content=raw, headers=headers)
    assert retry.status_code == 202, "the failed attempt must not have consumed the delivery id"
    assert len(sink.events) == 1
