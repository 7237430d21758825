"""1,000 registry deliveries, shuffled, duplicated, replayed and stale: 0 double transitions.

The API runs in process on the real database with the real signature check. What MLflow
(or an attacker) could send is mixed in one shuffled stream: each version's
`model_version.created`, exact replays of it (same delivery id), redeliveries of the same
event under new ids, tag and alias events, stale and future timestamps (some under ids that
were accepted, so the id check is not what stops them), and forged signatures. Every event the
receiver emits then runs the flow its trigger in prefect.yaml starts (intake, through the
real step against a `FakeRegistry`), in emission order, as Prefect would.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import func, select

from stagegate.db import transaction
from stagegate.events.signature import sign
from stagegate.events.sink import MemorySink, OutEvent
from stagegate.governance import audit
from stagegate.governance.models import AuditEntry, ModelVersion, Transition, WebhookDelivery
from stagegate.lifecycle.stages import Stage
from stagegate.settings import Settings
from stagegate.steps.intake import intake
from tests.fakes import FakeRegistry

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("fraud", "churn", "spam", "ltv")
PER_MODEL = 25  # 100 versions
SEED = 20261207
# How many of each kind of delivery (1,000 in all).
REPLAYS = 250  # byte-identical copies of an original: same id, same timestamp
REDELIVERIES = 150  # the same event again under a new delivery id
SIDE_EVENTS = 150  # tag and alias events (no flow is triggered by them)
STALE = 120  # signed, but older than the accepted window
STALE_REPLAYS = 80  # a recorded original replayed later: its own id, its old timestamp
FUTURE = 50
FORGED = 100  # tampered after signing, or signed with a guessed secret


@dataclass(frozen=True)
class Delivery:
    kind: str
    delivery_id: str
    raw: bytes
    headers: dict[str, str]


def _signed(secret: str, body: dict[str, Any], *, delivery_id: str, ts: int, kind: str) -> Delivery:
    raw = json.dumps(body).encode()
    headers = {
        "x-mlflow-delivery-id": delivery_id,
        "x-mlflow-timestamp": str(ts),
        "x-mlflow-signature": sign(secret, delivery_id, ts, raw),
        "content-type": "application/json",
    }
    return Delivery(kind, delivery_id, raw, headers)


def _created(model: str, version: int) -> dict[str, Any]:
    data = {"name": model, "version": str(version), "source": f"models:/{model}/{version}"}
    return {"entity": "model_version", "action": "created", "data": data}


def _deliveries(settings: Settings, rng: random.Random, now: int) -> list[Delivery]:
    secret, skew = settings.webhook.secret, settings.webhook.max_skew_s
    versions = [(m, v) for m in MODELS for v in range(1, PER_MODEL + 1)]

    def fresh_id() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128)))

    originals = [
        _signed(
            secret,
            _created(m, v),
            delivery_id=fresh_id(),
            ts=now - rng.randint(0, 60),
            kind="original",
        )
        for m, v in versions
    ]
    out = list(originals)
    out += [
        Delivery("replay", d.delivery_id, d.raw, d.headers)
        for d in rng.choices(originals, k=REPLAYS)
    ]
    out += [
        _signed(
            secret,
            _created(*rng.choice(versions)),
            delivery_id=fresh_id(),
            ts=now,
            kind="redelivery",
        )
        for _ in range(REDELIVERIES)
    ]
    for i in range(SIDE_EVENTS):
        m, v = rng.choice(versions)
        if i % 2:
            body = {
                "entity": "model_version_tag",
                "action": "set",
                "data": {"name": m, "version": str(v), "key": "team", "value": "risk"},
            }
        else:
            body = {
                "entity": "model_version_alias",
                "action": "created",
                "data": {"name": m, "version": str(v), "alias": "candidate"},
            }
        out.append(_signed(secret, body, delivery_id=fresh_id(), ts=now, kind="side"))
    out += [
        _signed(
            secret,
            _created(*rng.choice(versions)),
            delivery_id=fresh_id(),
            ts=now - skew - rng.randint(1, 86_400),
            kind="stale",
        )
        for _ in range(STALE)
    ]
    for d in rng.sample(originals, k=STALE_REPLAYS):
        body = json.loads(d.raw)
        old = now - skew - rng.randint(1, 30 * 86_400)
        out.append(_signed(secret, body, delivery_id=d.delivery_id, ts=old, kind="stale_replay"))
    out += [
        _signed(
            secret,
            _created(*rng.choice(versions)),
            delivery_id=fresh_id(),
            ts=now + skew + rng.randint(5, 3600),
            kind="future",
        )
        for _ in range(FUTURE)
    ]
    for i in range(FORGED):
        m, v = rng.choice(versions)
        if i % 2:  # a valid delivery whose version was changed in flight
            d = _signed(secret, _created(m, v), delivery_id=fresh_id(), ts=now, kind="forged")
            raw = d.raw.replace(f'"version": "{v}"'.encode(), f'"version": "{v + 100}"'.encode())
            assert raw != d.raw
            out.append(Delivery("forged", d.delivery_id, raw, d.headers))
        else:
            out.append(
                _signed(
                    "a-guessed-secret",
                    _created(m, v),
                    delivery_id=fresh_id(),
                    ts=now,
                    kind="forged",
                )
            )
    assert len(out) == 1000
    rng.shuffle(out)
    return out


def _intake_triggers() -> set[str]:
    """The events that start the intake deployment, as prefect.yaml declares them."""
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [deployment] = [d for d in doc["deployments"] if d["name"] == "intake"]
    return {name for trigger in deployment["triggers"] for name in trigger["expect"]}


def test_a_thousand_hostile_deliveries_make_one_transition_per_version(
    client: TestClient, settings: Settings, sink: MemorySink, engine: Engine
) -> None:
    rng = random.Random(SEED)
    stream = _deliveries(settings, rng, int(time.time()))
    answers: list[tuple[Delivery, int, dict[str, Any]]] = []
    for d in stream:
        r = client.post("/api/v1/events/mlflow", content=d.raw, headers=d.headers)
        answers.append((d, r.status_code, r.json()))

    # No server errors; every refusal is a 4xx that says why.
    assert [s for _, s, _ in answers if s >= 500] == []
    for d, status, body in answers:
        if status != 202:
            assert 400 <= status < 500, (d.kind, status, body)
            assert body["detail"], (d.kind, body)
            assert body["code"], (d.kind, body)

    by_kind: dict[str, Counter[tuple[int, str]]] = defaultdict(Counter)
    for d, status, body in answers:
        by_kind[d.kind][(status, body.get("code") or body["event"])] += 1
    timestamp_refusals = {"stale", "stale_replay", "future"}
    for kind in timestamp_refusals:
        assert set(by_kind[kind]) == {(401, "invalid_delivery")}, kind
    assert all(
        "s from now" in body["detail"] for d, _, body in answers if d.kind in timestamp_refusals
    )
    assert set(by_kind["forged"]) == {(401, "invalid_delivery")}
    assert all("signature" in b["detail"] for d, _, b in answers if d.kind == "forged")
    assert set(by_kind["redelivery"]) == {(202, "mlflow.model_version.created")}
    assert by_kind["side"] == {
        (202, "mlflow.model_version_tag.set"): SIDE_EVENTS // 2,
        (202, "mlflow.model_version_alias.created"): SIDE_EVENTS // 2,
    }

    # Each original id (sent once, replayed 0..n times, in any order) is accepted exactly once.
    copies: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for d, status, body in answers:
        if d.kind in ("original", "replay"):
            copies[d.delivery_id].append((status, body.get("code", "")))
    assert len(copies) == len(MODELS) * PER_MODEL
    for outcomes in copies.values():
        assert sorted(outcomes)[0][0] == 202
        assert sorted(outcomes)[1:] == [(409, "conflict")] * (len(outcomes) - 1)

    # One event per accepted delivery, never two for one id; one record and audit row each.
    accepted = [d.delivery_id for d, status, _ in answers if status == 202]
    assert (
        len(accepted) == len(set(accepted)) == len(MODELS) * PER_MODEL + REDELIVERIES + SIDE_EVENTS
    )
    emitted = [e.payload["delivery_id"] for e in sink.events]
    assert emitted == accepted
    with transaction(engine, read_only=True) as s:
        assert s.exec(select(func.count()).select_from(WebhookDelivery)).one() == len(accepted)
        received = s.exec(select(func.count()).where(AuditEntry.action == "webhook.received")).one()
        assert received == len(accepted)

    # Prefect's part: each event that the intake trigger expects starts one intake run.
    registry = FakeRegistry()
    for m in MODELS:
        for v in range(1, PER_MODEL + 1):
            registry.add(m, v)
    triggers = _intake_triggers()
    assert triggers == {"mlflow.model_version.created"}
    runs = [e for e in sink.events if e.event in triggers]
    assert len(runs) == len(MODELS) * PER_MODEL + REDELIVERIES
    flow_sink = MemorySink()
    recorded = Counter[tuple[str, int]]()
    for event in runs:
        result = _run_intake(engine, registry, flow_sink, event)
        recorded[(result.model, result.version)] += result.recorded

    with transaction(engine, read_only=True) as s:
        rows = s.exec(select(Transition)).all()
        per_version = Counter((t.model_name, t.version) for t in rows)
        assert len(per_version) == len(MODELS) * PER_MODEL
        assert set(per_version.values()) == {1}, "a version got two transitions"
        assert {(t.from_stage, t.to_stage) for t in rows} == {(Stage.candidate, Stage.shadow)}
        assert s.exec(select(func.count()).select_from(ModelVersion)).one() == len(per_version)
        chain = audit.verify(s)
        assert chain.ok, chain.reason
        assert chain.rows == s.exec(select(func.count()).select_from(AuditEntry)).one()
    assert set(recorded.values()) == {1}  # recorded by its first run; later ones found it


def _run_intake(engine: Engine, registry: FakeRegistry, sink: MemorySink, event: OutEvent) -> Any:
    """The intake flow's step, with the parameters its trigger templates from the payload."""
    return intake(engine, registry, sink, event.payload["name"], int(event.payload["version"]))
