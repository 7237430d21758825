"""How fast flows react on the embedded stack: registry event -> flow Running, approval -> applied.

Usage: .venv/bin/python benchmarks/flow_latency.py [--quick] [--runs N] [--baseline-runs M]

Starts the real embedded stack (MLflow, Prefect, the API, the worker, the router) on free
ports under a temporary STAGEGATE_HOME, then registers N versions of one model with MLflow's
client and walks each through the public API. Per version:

- event -> Running: from the `mlflow.model_version.created` Prefect event's `occurred` time
  (stamped by the API when the webhook arrives) to the `start_time` of the intake flow run it
  triggered (read from Prefect's API: the time the run entered Running). `register -> Running`
  is the same end, from the moment `register_model` returned in this process.
- approval -> applied: the version is a candidate; an approver rejects the intake's
  candidate->shadow, the author requests candidate->rejected, and an approver approves it.
  Timed from just before that approval POST (the one that makes the transition `approved`)
  until GET /api/v1/transitions/{id} answers `applied` (polled every 50 ms). The promote flow
  runs for it like for any move, endpoint sync included. This move was chosen because it
  needs no report and no model server, so the figure is the control plane alone (event,
  trigger, run start, apply), the same for every sample, with nothing left running between
  samples. A move whose version is already served (canary->production) goes through the same
  path; it first needs shadow and canary reports, which take the evaluation flows' 5 s polls
  and model servers, and would make a sample cost a minute. The server-stamped
  `applied_at - decided_at` is reported too. The promote run's own event -> Running
  (`stagegate.transition.approved` -> Running) is reported as well.

The baseline is a peer in the same run: the worker is restarted with
`STAGEGATE_WORKER_START=spawn` (Prefect's own start: a fresh interpreter per run) and the same
samples are taken, after the warm ones, on the same stack.

Prints readable lines, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from stagegate import embedded, stack, supervise, warm_start
from stagegate.db import make_engine, transaction
from stagegate.governance import tokens
from stagegate.lifecycle.stages import Role
from stagegate.settings import (
    ApiSettings,
    MlflowSettings,
    PrefectSettings,
    ServingSettings,
    Settings,
)

MODEL = "latency-bench"
TIMEOUT_S = 90.0
POLL_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def wait_for(what: str, probe: Any, interval_s: float = POLL_S) -> Any:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if (found := probe()) is not None:
            return found
        time.sleep(interval_s)
    raise SystemExit(f"timed out after {TIMEOUT_S:.0f} s waiting for {what}")


class Bench:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.api = httpx.Client(base_url=settings.api.url, timeout=30, trust_env=False)
        self.prefect = httpx.Client(base_url=settings.prefect.api_url, timeout=30, trust_env=False)
        self.who: dict[str, dict[str, str]] = {}

    def issue_tokens(self) -> None:
        engine = make_engine(self.settings.database_url)
        with transaction(engine) as s:
            for name, role in (
                ("dana", Role.author),
                ("alice", Role.approver),
                ("vic", Role.viewer),
            ):
                token = tokens.create_token(s, name=name, role=role, actor="bench")
                self.who[name] = {"Authorization": f"Bearer {token}"}
        engine.dispose()

    def call(self, who: str, method: str, path: str, **kw: Any) -> Any:
        r = self.api.request(method, path, headers=self.who[who], **kw)
        if r.status_code >= 400:
            raise SystemExit(f"{method} {path} as {who}: {r.status_code} {r.text}")
        return r.json()

    def register(self, seed: int) -> int:
        import mlflow
        import mlflow.sklearn
        from sklearn.datasets import make_classification
        from sklearn.linear_model import LogisticRegression

        x, y = make_classification(n_samples=200, n_features=6, random_state=seed)
        model = LogisticRegression(max_iter=200).fit(x, y)
        mlflow.set_tracking_uri(self.settings.mlflow.tracking_uri)
        with warnings.catch_warnings(), mlflow.start_run():
            warnings.simplefilter("ignore")
            mlflow.log_metric("accuracy", float(model.score(x, y)))
            info: Any = mlflow.sklearn.log_model(
                model, name="model", pip_requirements=["scikit-learn"]
            )
            registered: Any = mlflow.register_model(info.model_uri, MODEL)
        return int(registered.version)

    # -- Prefect's side -----------------------------------------------------------------
    def event_occurred(self, name: str, label: str, value: str) -> float | None:
        r = self.prefect.post(
            "/events/filter",
            json={
                "filter": {"event": {"name": [name]}, "resource": {"id_prefix": ["stagegate."]}},
                "limit": 50,
            },
        )
        r.raise_for_status()
        for e in r.json()["events"]:
            if e["resource"].get(label) == value:
                return ts(e["occurred"])
        return None

    def run_started(self, deployment: str, key: str, value: Any) -> dict[str, Any] | None:
        """The newest run of `deployment` whose parameter `key` is `value`, once Running."""
        r = self.prefect.post(
            "/flow_runs/filter",
            json={
                "deployments": {"name": {"any_": [deployment]}},
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": 20,
            },
        )
        r.raise_for_status()
        for run in r.json():
            if run["parameters"].get(key) == value and run.get("start_time"):
                return dict(run)
        return None

    # -- one sample ---------------------------------------------------------------------
    def sample(self, seed: int) -> dict[str, float]:
        version = self.register(seed)
        registered = time.time()
        intake = wait_for(
            f"intake of v{version} to run",
            lambda: self.run_started("intake", "version", version),
            interval_s=0.2,
        )
        created = wait_for(
            "the created event",
            lambda: self.event_occurred(
                "mlflow.model_version.created", "stagegate.model.version", str(version)
            ),
            interval_s=0.2,
        )
        running = ts(intake["start_time"])

        def opened() -> dict[str, Any] | None:
            page = self.call(
                "vic", "GET", "/api/v1/transitions", params={"model": MODEL, "status": "pending"}
            )
            return next((t for t in page["data"] if t["version"] == version), None)

        first = wait_for(f"intake to open a transition for v{version}", opened)
        self.call(
            "alice",
            "POST",
            f"/api/v1/transitions/{first['id']}/approvals",
            json={"decision": "reject", "comment": "bench"},
        )
        t = self.call(
            "dana",
            "POST",
            "/api/v1/transitions",
            json={"model": MODEL, "version": version, "to_stage": "rejected", "reason": "bench"},
        )
        approve_at = time.monotonic()
        t = self.call(
            "alice",
            "POST",
            f"/api/v1/transitions/{t['id']}/approvals",
            json={"decision": "approve", "comment": "bench"},
        )
        if t["status"] != "approved":
            raise SystemExit(f"candidate->rejected not approved: {t['gates']}")

        def applied() -> dict[str, Any] | None:
            doc = self.call("vic", "GET", f"/api/v1/transitions/{t['id']}")
            if doc["status"] in {"failed", "cancelled"}:
                raise SystemExit(f"transition {t['id']} {doc['status']}: {doc['status_reason']}")
            return dict(doc) if doc["status"] == "applied" else None

        done = wait_for(f"transition {t['id']} to be applied", applied)
        approval_to_applied = time.monotonic() - approve_at
        promote = wait_for(
            "the promote run", lambda: self.run_started("promote", "transition_id", t["id"])
        )
        approved_event = wait_for(
            "the approved event",
            lambda: self.event_occurred(
                "stagegate.transition.approved", "stagegate.transition.id", t["id"]
            ),
            interval_s=0.2,
        )
        return {
            "version": version,
            "event_to_running_s": running - created,
            "register_to_running_s": running - registered,
            "approval_to_applied_s": approval_to_applied,
            "decided_to_applied_at_s": ts(done["applied_at"]) - ts(done["decided_at"]),
            "approved_event_to_running_s": ts(promote["start_time"]) - approved_event,
        }


def restart_worker(settings: Settings, mode: str) -> float:
    started = time.monotonic()
    supervise.down(settings.home, names=["worker"])
    os.environ[warm_start.MODE_ENV] = mode
    stack.up(settings, services=["worker"], timeout_s=180)
    return time.monotonic() - started


def pct(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(samples: list[dict[str, float]]) -> dict[str, float | int]:
    out: dict[str, float | int] = {"runs": len(samples)}
    for key in (
        "event_to_running_s",
        "register_to_running_s",
        "approval_to_applied_s",
        "decided_to_applied_at_s",
        "approved_event_to_running_s",
    ):
        xs = [s[key] for s in samples]
        stem = key.removesuffix("_s")
        out[f"{stem}_p50_s"] = round(statistics.median(xs), 3)
        out[f"{stem}_p95_s"] = round(pct(xs, 0.95), 3)
    return out


def measure(bench: Bench, label: str, n: int, seed0: int) -> list[dict[str, float]]:
    samples = []
    for i in range(n):
        s = bench.sample(seed0 + i)
        samples.append(s)
        print(
            f"{label} v{s['version']}: event->Running {s['event_to_running_s']:.2f} s, "
            f"register->Running {s['register_to_running_s']:.2f} s, "
            f"approval->applied {s['approval_to_applied_s']:.2f} s, "
            f"approved event->Running {s['approved_event_to_running_s']:.2f} s",
            flush=True,
        )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 warm samples and 1 baseline")
    parser.add_argument("--runs", type=int, help="warm samples (default 3 quick, 12 full)")
    parser.add_argument("--baseline-runs", type=int, help="spawn samples (default 1 quick, 5 full)")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 12)
    baseline_runs = (
        args.baseline_runs if args.baseline_runs is not None else (1 if args.quick else 5)
    )
    for name in ("mlflow", "alembic", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stagegate-latency-") as tmp:
        mlflow_port, prefect_port = free_port(), free_port()
        settings = Settings(
            home=Path(tmp) / "home",
            mlflow=MlflowSettings(port=mlflow_port, tracking_uri=f"http://127.0.0.1:{mlflow_port}"),
            prefect=PrefectSettings(
                port=prefect_port, api_url=f"http://127.0.0.1:{prefect_port}/api"
            ),
            api=ApiSettings(port=free_port()),
            serving=ServingSettings(router_port=free_port(), device="cpu"),
        )
        os.environ[warm_start.MODE_ENV] = warm_start.FORKSERVER
        try:
            embedded.start(settings, timeout_s=180)
            print(f"stack up in {time.monotonic() - began:.1f} s", flush=True)
            bench = Bench(settings)
            bench.issue_tokens()
            warm = measure(bench, "forkserver", runs, seed0=0)
            baseline: list[dict[str, float]] = []
            if baseline_runs:
                took = restart_worker(settings, warm_start.SPAWN)
                print(f"worker restarted with spawn in {took:.1f} s", flush=True)
                baseline = measure(bench, "spawn", baseline_runs, seed0=1000)
        finally:
            stack.down(settings)

    result: dict[str, Any] = {
        "benchmark": "flow_latency",
        "quick": args.quick,
        "worker_start": warm_start.FORKSERVER,
        "runner_poll_s": settings.prefect.runner_poll_s,
        "cpus": os.cpu_count(),
        **summary(warm),
        "baseline": {"worker_start": warm_start.SPAWN, **summary(baseline)} if baseline else None,
        "goals": {"event_to_running_p50_s": 2.0, "approval_to_applied_p50_s": 3.0},
        "wall_s": round(time.monotonic() - began, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
