"""The drift routes: checks over time with per-feature scores, the stored Evidently report
(authorized, sandboxed, refused once its file changed), and acknowledging an alarm."""

from __future__ import annotations

import gzip
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from stagegate.events.sink import MemorySink
from stagegate.lifecycle.policy import DriftActions
from stagegate.settings import Settings
from tests.factories import Factory
from tests.test_drift_step import World, frame


def _world(engine: Engine, factory: Factory, sink: MemorySink, settings: Settings) -> World:
    return World(engine, factory, sink, settings.inference_log_url)


def test_drift_history_report_and_acknowledgement(
    client: TestClient, engine: Engine, factory: Factory, sink: MemorySink, settings: Settings
) -> None:
    world = _world(engine, factory, sink, settings)
    world.drift(html_report=True, actions=DriftActions(emit_event=False))
    world.current = frame(2, shift=30, new_category=True)
    outcome = world.check()
    viewer = factory.token("viv", "viewer")
    approver = factory.token("ava", "approver")

    history = client.get("/api/v1/models/fraud/versions/2/drift", headers=viewer)
    assert history.status_code == 200, history.text
    body = history.json()
    [checked] = body["checks"]
    assert checked["verdict"] == "drift"
    assert checked["window_end"] is not None
    assert checked["digest"]
    scores = {c["column"]: c for c in checked["columns"]}
    assert scores["amount"]["drifted"]
    assert scores["amount"]["test"] == "wasserstein"
    assert not scores["age"]["drifted"]
    assert checked["report_url"] == f"/api/v1/reports/{outcome.evaluation_id}"
    [alarm] = body["alarms"]
    assert alarm["status"] == "open"
    assert alarm["drifted_features"] == ["amount", "channel"]

    lineage = client.get("/api/v1/models/fraud/versions/2/lineage", headers=viewer).json()
    [linked] = lineage["drift"]
    assert linked["evaluation_id"] == outcome.evaluation_id
    assert linked["report_url"] == checked["report_url"]
    assert linked["drifted_features"] == ["amount", "channel"]

    assert client.get(checked["report_url"]).status_code == 401
    page = client.get(checked["report_url"], headers=viewer)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == "sandbox allow-scripts"
    assert "Drift for column amount" in page.text

    # A report file changed after the check is not served as the check's.
    stored = next(Path(settings.inference_log_url, "_reports").rglob("*.html.gz"))
    assert stored.stat().st_size < len(page.content) / 2
    stored.write_bytes(gzip.compress(b"<script>alert(1)</script>"))
    tampered = client.get(checked["report_url"], headers=viewer)
    assert tampered.status_code == 404
    assert "changed after the check" in tampered.json()["detail"]
    assert client.get("/api/v1/reports/999999", headers=viewer).status_code == 404

    ack = f"/api/v1/drift-alarms/{alarm['id']}/acknowledge"
    assert client.post(ack, json={}, headers=viewer).status_code == 403
    done = client.post(ack, json={"comment": "seasonal"}, headers=approver)
    assert done.status_code == 200, done.text
    assert done.json()["acknowledged_by"] == "ava"
    assert client.post(ack, json={}, headers=approver).status_code == 409
    assert (
        client.post("/api/v1/drift-alarms/nope/acknowledge", json={}, headers=approver).status_code
        == 404
    )
