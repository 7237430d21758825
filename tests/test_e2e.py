"""End to end on the real embedded stack: MLflow, Prefect, the API and the worker.

Register with MLflow's client -> webhook -> Prefect event -> intake flow opens a transition
-> approvals through the API -> promote flow -> production, alias moved, audit intact.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stagegate import embedded, stack
from stagegate.db import make_engine, transaction
from stagegate.governance import tokens
from stagegate.lifecycle.stages import Role
from stagegate.registry.mlflow import MlflowRegistry
from stagegate.settings import (
    ApiSettings,
    MlflowSettings,
    PrefectSettings,
    ServingSettings,
    Settings,
)
from tests.fixtures.mlflow_server import free_port, register_sklearn_model
from tests.waits import gone
from tests.waits import wait_for as _wait_for

pytestmark = pytest.mark.e2e

MODEL = "e2e-fraud"


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float = 90) -> Any:
    """A real stack on 2 cores: longer default waits than the unit-level tests."""
    return _wait_for(what, probe, timeout_s, interval_s=0.25)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    mlflow_port, prefect_port, api_port = free_port(), free_port(), free_port()
    settings = Settings(
        home=tmp_path_factory.mktemp("stack") / "home",
        mlflow=MlflowSettings(port=mlflow_port, tracking_uri=f"http://127.0.0.1:{mlflow_port}"),
        prefect=PrefectSettings(port=prefect_port, api_url=f"http://127.0.0.1:{prefect_port}/api"),
        api=ApiSettings(port=api_port),
        serving=ServingSettings(
            router_port=free_port(), device="cpu", log_features_flush_interval_s=1.0
        ),
    )
    try:
        embedded.start(settings)
        yield settings
    finally:
        stack.down(settings)


def people(live: Settings) -> dict[str, dict[str, str]]:
    engine = make_engine(live.database_url)
    with transaction(engine) as s:
        who = {
            name: {"Authorization": "Bearer " + tokens.create_token(s, name=name, role=role)}
            for name, role in [
                ("dana", Role.author),
                ("alice", Role.approver),
                ("bob", Role.approver),
                ("vic", Role.viewer),
                ("ops", Role.admin),
            ]
        }
    engine.dispose()
    return who


def test_registered_version_reaches_production(live: Settings) -> None:
    with httpx.Client(base_url=live.api.url, timeout=15, trust_env=False) as api:
        walk_to_production(live, api, people(live))


def test_drifting_traffic_opens_a_rollback_through_the_scheduled_flow(live: Settings) -> None:
    """Drifted rows through the real router; the worker runs the drift-check deployment; the
    check reads the logged features and the reference from MLflow, and opens a rollback."""
    who = people(live)
    with (
        httpx.Client(base_url=live.api.url, timeout=15, trust_env=False) as api,
        httpx.Client(base_url=live.prefect.api_url, timeout=15, trust_env=False) as prefect,
    ):
        drift_opens_a_rollback(live, api, prefect, who)


def drift_opens_a_rollback(
    live: Settings, api: httpx.Client, prefect: httpx.Client, who: dict[str, dict[str, str]]
) -> None:
    import numpy as np
    from sklearn.datasets import make_classification

    from stagegate.serving.inference_log.writer import read_features

    version = api.get(f"/api/v1/models/{MODEL}/production", headers=who["vic"]).json()["version"]
    if version is None:  # run alone: walk a version to production first
        walk_to_production(live, api, who)
        version = api.get(f"/api/v1/models/{MODEL}/production", headers=who["vic"]).json()[
            "version"
        ]
    policy = api.get(f"/api/v1/models/{MODEL}/policy", headers=who["vic"]).json()
    policy["drift"].update(
        min_rows=50,
        interval_s=1,  # the scheduled window ends at the last whole second
        exclude_columns=["target"],
        drift_share=0.1,
        actions={"rollback": True},
    )
    r = api.put(f"/api/v1/models/{MODEL}/policy", headers=who["ops"], json=policy)
    assert r.status_code == 200, r.text

    # The training rows of the registered model, f0 shifted by five standard deviations.
    features, _ = make_classification(n_samples=200, n_features=6, random_state=0)
    features[:, 0] += 5 * features[:, 0].std()
    url = f"{live.serving.router_url}/models/{MODEL}/invocations"
    columns = [f"f{i}" for i in range(6)]
    with httpx.Client(timeout=10, trust_env=False) as router:
        for row in np.round(features, 6).tolist():
            answer = router.post(url, json={"dataframe_split": {"columns": columns, "data": [row]}})
            assert answer.status_code == 200, answer.text
    wait_for(
        "the router to write the drifted rows' features",
        lambda: read_features(live.inference_log_url, model=MODEL, version=version).num_rows >= 200,
        timeout_s=30,
    )
    time.sleep(1.5)  # the scheduled window ends on a whole second before now

    deployment = prefect.get("/deployments/name/drift-check/drift-check").json()
    run = prefect.post(f"/deployments/{deployment['id']}/create_flow_run", json={}).json()

    def finished() -> dict[str, Any] | None:
        doc: dict[str, Any] = prefect.get(f"/flow_runs/{run['id']}").json()
        return doc if doc["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED"} else None

    assert wait_for("the drift-check run", finished, timeout_s=180)["state"]["type"] == "COMPLETED"
    history = api.get(f"/api/v1/models/{MODEL}/versions/{version}/drift", headers=who["vic"]).json()
    [check] = history["checks"]
    assert check["verdict"] == "drift", check["reason"]
    assert "f0" in check["drifted_features"]
    assert check["sample_size"] >= 200
    [alarm] = history["alarms"]
    rollback = api.get(
        f"/api/v1/transitions/{alarm['rollback_transition_id']}", headers=who["vic"]
    ).json()
    assert (rollback["to_stage"], rollback["status"]) == ("rolled_back", "pending")
    assert rollback["requested_by"] == "stagegate"
    assert alarm["event_emitted"]


def test_a_labelled_canary_runs_to_a_decision_through_the_flow(live: Settings) -> None:
    """v2 in canary against the champion through the real router; labels posted to the API;
    the canary flow's sequential test decides, records it, and requests production."""
    import numpy as np

    who = people(live)
    rng = np.random.default_rng(3)
    with httpx.Client(base_url=live.api.url, timeout=15, trust_env=False) as api:
        champion = api.get(f"/api/v1/models/{MODEL}/production", headers=who["vic"]).json()
        if champion["version"] is None:  # run alone: walk a version to production first
            walk_to_production(live, api, who)
            champion = api.get(f"/api/v1/models/{MODEL}/production", headers=who["vic"]).json()
        policy = api.get(f"/api/v1/models/{MODEL}/policy", headers=who["vic"]).json()
        policy["shadow"]["required"] = False
        policy["traffic"]["challenger_weight"] = 0.5
        policy["experiment"] = {
            "metric": "converted",
            "min_samples": 40,
            "max_samples": 200,  # about 1.1x the fixed-horizon sample of this test's effect
            "attribution_window_s": 60,
            "max_latency_increase_ms": 1000,  # a loaded CI machine: this test is about labels
        }
        r = api.put(f"/api/v1/models/{MODEL}/policy", headers=who["ops"], json=policy)
        assert r.status_code == 200, r.text
        version, _ = register_sklearn_model(live.mlflow.tracking_uri, MODEL, seed=5)

        def opened() -> dict[str, Any] | None:
            page = api.get(
                "/api/v1/transitions",
                params={"model": MODEL, "status": "pending"},
                headers=who["vic"],
            )
            return next((t for t in page.json()["data"] if t["version"] == version), None)

        def stage() -> str:
            return str(
                api.get(f"/api/v1/models/{MODEL}/versions/{version}", headers=who["vic"]).json()[
                    "stage"
                ]
            )

        t = wait_for("intake to open a transition", opened)
        assert (
            api.post(
                f"/api/v1/transitions/{t['id']}/approvals",
                headers=who["alice"],
                json={"decision": "approve"},
            ).json()["status"]
            == "approved"
        )
        wait_for("shadow", lambda: stage() == "shadow")
        r = api.post(
            "/api/v1/transitions",
            headers=who["dana"],
            json={"model": MODEL, "version": version, "to_stage": "canary", "reason": "e2e"},
        )
        assert (
            api.post(
                f"/api/v1/transitions/{r.json()['id']}/approvals",
                headers=who["bob"],
                json={"decision": "approve"},
            ).json()["status"]
            == "approved"
        )
        wait_for("canary", lambda: stage() == "canary")

        url = f"{live.serving.router_url}/models/{MODEL}/invocations"
        body = {"dataframe_split": {"columns": [f"f{i}" for i in range(6)], "data": [[0.5] * 6]}}
        path = f"/api/v1/models/{MODEL}/versions/{version}/experiment"
        answered: dict[str, int] = {}
        deadline = time.monotonic() + 240
        with httpx.Client(timeout=10, trust_env=False) as router:
            while (doc := api.get(path, headers=who["vic"]).json())["decision"] is None:
                assert time.monotonic() < deadline, f"no decision: {doc['looks'][-1:]}"
                labels = []
                for _ in range(40):
                    a = router.post(url, json=body, headers={"x-stagegate-key": uuid.uuid4().hex})
                    assert a.status_code == 200, a.text
                    served = a.headers["x-stagegate-version"]
                    answered[served] = answered.get(served, 0) + 1
                    # The world this test plays: the new version's users convert far more.
                    p = 0.8 if served == str(version) else 0.2
                    labels.append(
                        {
                            "request_id": a.headers["x-request-id"],
                            "model": MODEL,
                            "label": {"converted": int(rng.random() < p)},
                        }
                    )
                posted = api.post("/api/v1/feedback", headers=who["dana"], json={"items": labels})
                assert posted.status_code == 202, posted.text
                time.sleep(1)
        assert set(answered) == {str(version), str(champion["version"])}
        decision = doc["decision"]
        assert (decision["action"], decision["passed"]) == ("promote", True), decision
        assert decision["champion_version"] == champion["version"]
        assert doc["looks"], "the flow's looks are stored for the chart"
        assert doc["looks"][-1]["lower"] > 0
        requested = wait_for("the experiment to request production", opened)
        assert (requested["to_stage"], requested["requested_by"]) == ("production", "stagegate")
        gates = {g["gate"]: g for g in requested["gates"]}
        assert gates["experiment"]["passed"], gates


def walk_to_production(live: Settings, api: httpx.Client, who: dict[str, dict[str, str]]) -> None:
    # 1. A data scientist registers a version with MLflow's own client.
    registered_at = time.monotonic()
    version, run_id = register_sklearn_model(live.mlflow.tracking_uri, MODEL)

    # 2. Webhook -> Prefect event -> intake flow: a candidate->shadow transition opens.
    def opened() -> dict[str, Any] | None:
        page = api.get("/api/v1/transitions", params={"model": MODEL}, headers=who["vic"])
        return next((t for t in page.json()["data"] if t["version"] == version), None)

    t = wait_for("intake to open a transition", opened)
    print(f"register -> transition opened: {time.monotonic() - registered_at:.1f} s")
    assert t["from_stage"] == "candidate"
    assert t["to_stage"] == "shadow"
    assert t["requested_by"] == "stagegate"
    v = api.get(f"/api/v1/models/{MODEL}/versions/{version}", headers=who["vic"]).json()
    assert v["run_id"] == run_id
    assert len(v["digest"]) == 64
    assert v["datasets"], "intake records the training dataset"
    registry = MlflowRegistry(live.mlflow.tracking_uri)
    assert registry.describe_reference(MODEL, version) == f"runs:/{run_id}/stagegate/reference"
    reference = registry.load_reference(MODEL, version)  # the training frame, logged as Parquet
    assert reference.column_names == [*(f"f{i}" for i in range(6)), "target"]
    assert reference.num_rows == 200

    def stage() -> str:
        r = api.get(f"/api/v1/models/{MODEL}/versions/{version}", headers=who["vic"])
        return str(r.json()["stage"])

    # 3. Approvals arrive through the API; the promote flow applies each move.
    def approve(tid: str, *approvers: str) -> None:
        for name in approvers:
            r = api.post(
                f"/api/v1/transitions/{tid}/approvals",
                headers=who[name],
                json={"decision": "approve", "comment": "e2e"},
            )
            assert r.status_code == 201, r.text
        assert r.json()["status"] == "approved", r.json()

    approve(t["id"], "alice")
    wait_for("shadow", lambda: stage() == "shadow")

    def report(kind: str) -> dict[str, Any] | None:
        rows = api.get(
            f"/api/v1/models/{MODEL}/versions/{version}/evaluations", headers=who["vic"]
        ).json()
        return next((e for e in rows if e["kind"] == kind), None)

    for to, approvers in (("canary", ("bob",)), ("production", ("alice", "bob"))):
        # The shadow/canary flow (triggered by stagegate.transition.applied) writes the report
        # the next gate needs; a first version has no champion to compare with, so it passes.
        written = wait_for(
            f"the {'shadow' if to == 'canary' else 'canary'} report",
            lambda to=to: report("shadow" if to == "canary" else "canary"),
        )
        assert written["passed"], written
        r = api.post(
            "/api/v1/transitions",
            headers=who["dana"],
            json={"model": MODEL, "version": version, "to_stage": to, "reason": "e2e"},
        )
        assert r.status_code == 201, r.text
        approve(r.json()["id"], *approvers)
        wait_for(to, lambda to=to: stage() == to)

    # 4. Production in the API, the alias moved in MLflow, and the audit chain verifies.
    prod = api.get(f"/api/v1/models/{MODEL}/production", headers=who["vic"]).json()
    assert prod["version"] == version
    assert sorted(a["approver"] for a in prod["approved_by"]) == ["alice", "bob"]

    def champion_alias() -> dict[str, Any] | None:
        r = httpx.get(
            f"{live.mlflow.tracking_uri}/api/2.0/mlflow/registered-models/alias",
            params={"name": MODEL, "alias": "champion"},
            trust_env=False,
        )
        doc: dict[str, Any] = r.json().get("model_version", {})
        return doc if r.status_code == 200 and int(doc["version"]) == version else None

    # The registry mirror follows the database commit, so it may lag by a moment.
    mv = wait_for("the champion alias", champion_alias, timeout_s=30)
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    assert tags["stagegate.stage"] == "production"

    # 5. The promote flow deployed it and routed it (endpoint sync follows the stage commit):
    #    the router answers with this version.
    def routed() -> httpx.Response | None:
        r = httpx.post(
            f"{live.serving.router_url}/models/{MODEL}/invocations",
            json={"dataframe_split": {"columns": [f"f{i}" for i in range(6)], "data": [[0.5] * 6]}},
            timeout=10,
            trust_env=False,
        )
        return r if r.status_code == 200 else None

    answer = wait_for("the router to route the champion", routed, timeout_s=60)
    assert answer.headers["x-stagegate-version"] == str(version)
    assert answer.headers["x-stagegate-role"] == "champion"
    assert len(answer.json()["predictions"]) == 1
    verdict = api.get("/api/v1/audit/verify", headers=who["vic"]).json()
    assert verdict["ok"], verdict
    actions = {
        e["action"] for e in api.get("/api/v1/audit?limit=200", headers=who["vic"]).json()["data"]
    }
    assert {
        "webhook.received",
        "version.recorded",
        "approval.approve",
        "transition.applied",
    } <= actions


def test_status_reports_every_service_and_down_leaves_nothing(live: Settings) -> None:
    statuses = stack.status(live)
    assert set(statuses) == {"mlflow", "prefect", "api", "worker", "router"}
    assert all(s.healthy and s.pid for s in statuses.values()), statuses
    assert Path(statuses["api"].log).exists()


def test_the_watchdog_brings_a_killed_api_back_and_down_stops_it_first(live: Settings) -> None:
    """`stagegate up` (embedded.start) leaves a watchdog that brings a SIGKILLed API back.
    Last here, on this module's stack (a stack of its own took a minute more to start)."""
    health = f"{live.api.url}/api/health"

    def api_back(old_pid: int) -> bool:
        now = stack.status(live)["api"]
        if not now.running or now.pid == old_pid:
            return False
        try:
            return httpx.get(health, trust_env=False, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    dog = stack.watchdog_status(live)
    assert dog.running
    assert dog.pid is not None
    before = stack.status(live)["api"]
    assert before.pid is not None
    assert before.restarts == 0

    os.killpg(before.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for("the API to answer again", lambda: api_back(before.pid or 0))
    print(f"API answering again {time.monotonic() - killed_at:.1f} s after SIGKILL")

    after = stack.status(live)
    assert after["api"].restarts == 1
    assert after["api"].healthy
    assert all(after[n].restarts == 0 for n in ("mlflow", "prefect", "worker", "router"))

    stopped = stack.down(live)
    assert stopped[0] == "watchdog"
    assert {"mlflow", "prefect", "api", "worker", "router"} <= set(stopped)
    assert gone(dog.pid)
