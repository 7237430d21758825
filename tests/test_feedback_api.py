"""POST /api/v1/feedback: labels land beside the inference log; roles and bodies are checked."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stagegate.serving.inference_log.records import InferenceRecord
from stagegate.serving.inference_log.writer import LocalInferenceLog, read_labeled, read_labels
from stagegate.settings import Settings
from tests.factories import Factory, auth

URL = "/api/v1/feedback"


def item(request_id: str = "r1", label: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"request_id": request_id, "model": "fraud", "label": label, **extra}


@pytest.mark.parametrize("role", ["service", "author", "admin"])
def test_a_label_is_accepted_and_stored(
    client: TestClient, factory: Factory, settings: Settings, role: str
) -> None:
    headers = factory.token(f"labeler-{role}", role)
    response = client.post(URL, json=item(label={"fraud": True}), headers=headers)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 1}
    [stored] = read_labels(settings.inference_log_url).to_pylist()
    assert (stored["request_id"], stored["model"], stored["label"]) == (
        "r1",
        "fraud",
        '{"fraud":true}',
    )
    assert (datetime.now(UTC) - stored["at"]).total_seconds() < 60


def test_a_batch_joins_the_logged_records(
    client: TestClient, factory: Factory, settings: Settings
) -> None:
    log = LocalInferenceLog(settings.inference_log_url)
    for rid in ("r1", "r2"):
        log.append(
            InferenceRecord(
                rid, "fraud", 1, "champion", None, {"x": 1}, [0.9], 200, 2.0, datetime.now(UTC)
            )
        )
    log.close()
    batch = {"items": [item("r1", "yes"), item("r2", None), item("not-logged-yet", "no")]}
    response = client.post(URL, json=batch, headers=factory.token("svc", "service"))
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 3}
    labeled = read_labeled(settings.inference_log_url, "fraud").to_pylist()
    assert [(r["request_id"], r["label"]) for r in labeled] == [("r1", '"yes"'), ("r2", "null")]
    assert read_labels(settings.inference_log_url).num_rows == 3  # the unknown id is kept


def test_no_or_a_bad_token_is_401(client: TestClient) -> None:
    assert client.post(URL, json=item()).status_code == 401
    response = client.post(URL, json=item(), headers=auth("sg_nope"))
    assert response.status_code == 401
    assert response.json()["code"] == "unauthenticated"


@pytest.mark.parametrize("role", ["viewer", "approver"])
def test_other_roles_are_403(client: TestClient, factory: Factory, role: str) -> None:
    response = client.post(URL, json=item(), headers=factory.token(f"who-{role}", role))
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(item(extra="field"), id="extra-field"),
        pytest.param({"items": [item(extra="field")]}, id="extra-field-in-batch"),
        pytest.param({"items": [item(str(i)) for i in range(1001)]}, id="batch-too-large"),
        pytest.param({"items": []}, id="empty-batch"),
        pytest.param({"items": [item()], "request_id": "r1"}, id="batch-with-extra"),
        pytest.param({"request_id": "r1", "model": "fraud"}, id="no-label"),
        pytest.param(item(""), id="empty-request-id"),
    ],
)
def test_bad_bodies_are_422(client: TestClient, factory: Factory, body: dict[str, Any]) -> None:
    response = client.post(URL, json=body, headers=factory.token("svc", "service"))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "invalid_request"


def test_a_full_batch_of_1000_is_accepted(client: TestClient, factory: Factory) -> None:
    batch = {"items": [item(f"r{i}", i) for i in range(1000)]}
    response = client.post(URL, json=batch, headers=factory.token("svc", "service"))
    assert response.json() == {"accepted": 1000}


def test_an_unwritable_log_is_503(
    client: TestClient, factory: Factory, settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "blocker").write_text("a file where the log's folder should be")
    settings.serving.log_url = str(tmp_path / "blocker" / "log")
    response = client.post(URL, json=item(), headers=factory.token("svc", "service"))
    assert response.status_code == 503
    assert response.json()["code"] == "retryable"
    assert "retry-after" in response.headers
