"""Kill anywhere: SIGKILL a worker run at every side effect of intake, promote, shadow and
canary, three times over, and the platform still ends where an unbroken run ends.

For each flow and each kill point k (see `tests/fixtures/killable_worker.py`: every database
commit that writes, MLflow write, Kubernetes write and Prefect event, plus the end):

1. a fresh model is brought to the state the flow starts from, through the real steps;
2. the flow's run is SIGKILLed at its k-th point, and so is its retry, and the retry's retry;
3. one reconcile pass runs (in a process of its own, as the worker's schedule would);
4. the database, the MLflow stage tags and aliases, the Kubernetes objects and the announced
   events must then agree, and equal what an unbroken run of the same flow left behind
   (the same audit rows, reports, transitions and event ids: no side effect twice);
5. the flow's run is then retried to the end: nothing changes any more.

Real parts: the governance database (PostgreSQL when configured, else SQLite), an MLflow
server of this module's own (reconcile reads the whole registry), the Kubernetes backend's
real client over HTTP against `tests/kube_fake.py` (no API server can run here), and Prefect's
`/events` as a recording HTTP stub. The worker's steps run in processes forked from a
forkserver with the imports preloaded; Prefect's engine is not in the loop: a crashed flow
run is never resumed by Prefect itself, only retried by a new event or by reconcile.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, Configuration
from mlflow.tracking import MlflowClient
from sqlalchemy import text
from sqlmodel import select

from stagegate.db import Engine, make_engine, transaction, utcnow
from stagegate.events.sink import MemorySink
from stagegate.governance import audit, endpoints, transitions, versions
from stagegate.governance.models import AuditEntry, Evaluation, Transition, TransitionStatus
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.serving_spec import ServingSpec
from stagegate.lifecycle.stages import REGISTRY_ALIAS, DeploymentRole, Role, Stage
from stagegate.migrate import upgrade
from stagegate.registry.mlflow import MlflowRegistry
from stagegate.registry.protocol import STAGE_TAG
from stagegate.serving.backends.kubernetes.backend import KubernetesBackend
from stagegate.serving.backends.kubernetes.builders import Cluster
from stagegate.serving.backends.kubernetes.live import LiveClient
from stagegate.serving.inference_log.records import InferenceRecord
from stagegate.serving.inference_log.writer import LocalInferenceLog
from stagegate.steps.apply import apply_transition
from stagegate.steps.converge import DataPlane, converge
from stagegate.steps.evaluate import evaluate
from stagegate.steps.intake import intake
from tests.conftest import PG_URL
from tests.fixtures.killable_worker import Job, run
from tests.fixtures.mlflow_server import MlflowServer, register_sklearn_model, run_mlflow_server
from tests.kube_fake import FakeKube, WireServer

pytestmark = pytest.mark.slow

# How many runs in a row die at the same point: the run, its retry, the retry's retry
# (`make chaos`, as issue 9 asks). `make test` kills each point once, to stay short.
KILLS = int(os.environ.get("STAGEGATE_KILLS", "1"))
CHILD_TIMEOUT_S = 60
NAMESPACE = "serving"
ALICE = Principal("alice", Role.approver)
BOB = Principal("bob", Role.approver)
DANA = Principal("dana", Role.author)
PRELOAD = [
    "stagegate.steps.reconcile",
    "stagegate.registry.mlflow",
    "stagegate.serving.backends.kubernetes.live",
    "tests.fixtures.killable_worker",
]


# -- the parts ----------------------------------------------------------------------------


class EventRecorder:
    """Prefect's `/events`, recording what arrives (a 204 each, as Prefect answers)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.events.extend(json.loads(body))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """Its own server: reconcile reads the whole registry, and must find only this module's."""
    with run_mlflow_server(tmp_path_factory.mktemp("kill-mlflow")) as server:
        yield server


class Databases:
    """Governance databases made from saved ones: a migrated empty one, and each flow's
    starting state, copied before every run (PostgreSQL when the run has one, else SQLite)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pg = PG_URL or None
        self.made: list[str] = []
        if self.pg:
            self.admin = make_engine(self.pg).execution_options(isolation_level="AUTOCOMMIT")
        self.empty = self.url("kill_empty")
        self._create("kill_empty", template=None)
        upgrade(self.empty)

    def url(self, name: str) -> str:
        if self.pg:
            return self.pg.rsplit("/", 1)[0] + f"/{name}"
        return f"sqlite:///{self.root / name}.db"

    def _create(self, name: str, template: str | None) -> None:
        if self.pg:
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
                conn.execute(
                    text(
                        f'CREATE DATABASE "{name}"'
                        + (f' TEMPLATE "{template}"' if template else "")
                    )
                )
            self.made.append(name)
        elif template is not None:
            with (
                sqlite3.connect(self.root / f"{template}.db") as src,
                sqlite3.connect(self.root / f"{name}.db") as dst,
            ):
                src.backup(dst)

    def copy(self, template: str, name: str) -> str:
        """A new database `name` holding what `template` holds (no one may be connected to it)."""
        self._create(name, template)
        return self.url(name)

    def close(self) -> None:
        if self.pg:
            with self.admin.connect() as conn:
                for name in self.made:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            self.admin.engine.dispose()


@pytest.fixture(scope="module")
def forkserver() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@dataclass
class World:
    dbs: Databases
    mlflow: MlflowServer
    registry: MlflowRegistry
    kube: WireServer
    events: EventRecorder
    log_root: Path
    traces: Path
    ctx: multiprocessing.context.ForkServerContext
    source: str
    run_id: str
    model_id: str | None
    plane: DataPlane = field(init=False)
    db_url: str = field(init=False)
    engine: Engine = field(init=False)

    def __post_init__(self) -> None:
        self.db_url = self.dbs.empty
        self.engine = make_engine(self.db_url)
        backend = KubernetesBackend(
            LiveClient(ApiClient(Configuration(host=self.kube.url))),
            Cluster(namespace=NAMESPACE),
            lambda _: ServingSpec(),
            poll_s=0.05,
        )
        self.plane = DataPlane(backend, router_url=None, log_url=str(self.log_root))

    def use(self, url: str) -> None:
        """Work on the database at `url` from now on."""
        self.engine.dispose()
        self.db_url, self.engine = url, make_engine(url)

    # registry -----------------------------------------------------------------------------

    def register(self, model: str) -> int:
        """A new MLflow version of `model`, on the module's one trained artifact."""
        client = MlflowClient(self.mlflow.url)
        if not client.search_registered_models(filter_string=f"name = '{model}'"):
            client.create_registered_model(model)
        mv = client.create_model_version(
            model, self.source, run_id=self.run_id, model_id=self.model_id, await_creation_for=0
        )
        return int(mv.version)

    # the worker's runs --------------------------------------------------------------------

    def run(self, flow: str, args: dict[str, Any], *, kill_at: int | None, tag: str) -> int:
        """Run one flow in a child; return how many kill points it passed (-1 if killed)."""
        trace = self.traces / f"{tag}.trace"
        job = Job(
            flow=flow,
            args=args,
            db_url=self.db_url,
            mlflow_url=self.mlflow.url,
            kube_url=self.kube.url,
            events_url=self.events.url,
            log_url=str(self.log_root),
            trace=trace,
            kill_at=kill_at,
            namespace=NAMESPACE,
        )
        child = self.ctx.Process(target=run, args=(job,))
        child.start()
        child.join(CHILD_TIMEOUT_S)
        if child.exitcode is None:
            child.kill()
            pytest.fail(f"{tag}: the {flow} run hung")
        error = trace.with_suffix(".error")
        assert child.exitcode != 1, f"{tag}: the {flow} run failed:\n{error.read_text()}"
        lines = trace.read_text().splitlines() if trace.exists() else []
        if child.exitcode == -9:
            assert len(lines) == kill_at, f"{tag}: killed elsewhere than point {kill_at}"
            return -1
        assert child.exitcode == 0, f"{tag}: exit {child.exitcode}"
        return len(lines)

    # parent-side steps, to bring a model where a flow starts --------------------------------

    def intake(self, model: str, version: int) -> str:
        result = intake(self.engine, self.registry, MemorySink(), model, version)
        assert result.transition_id is not None
        return result.transition_id

    def request(self, model: str, version: int, to: Stage) -> str:
        with transaction(self.engine) as s:
            t, _ = transitions.request(
                s,
                principal=DANA,
                model=model,
                version=version,
                to_stage=to,
                reason="kill-anywhere",
                now=utcnow(),
            )
        return t.id

    def approve(self, tid: str, *people: Principal) -> TransitionStatus:
        status = TransitionStatus.pending
        for who in people:
            with transaction(self.engine) as s:
                t = transitions.decide(
                    s,
                    principal=who,
                    transition_id=tid,
                    decision="approve",
                    comment=None,
                    now=utcnow(),
                )
                status = t.status
        return status

    def apply(self, tid: str) -> None:
        result = apply_transition(self.engine, self.registry, tid, backend="kubernetes")
        assert result.status is TransitionStatus.applied, result.reason
        converge(self.engine, MemorySink(), self.plane, result.model)

    def report(self, model: str, version: int) -> None:
        result = evaluate(self.engine, MemorySink(), str(self.log_root), model, version)
        assert result.decided, result.reason
        assert result.passed, result.reason

    def traffic(self, model: str, arm: int, role: DeploymentRole) -> None:
        """Answers of the champion (v1) and of `arm` in `role` that agree and are healthy:
        enough for the default policy to decide the report at once."""
        log = LocalInferenceLog(str(self.log_root), flush_interval_s=0.05)
        at = utcnow() + timedelta(seconds=1)
        for i in range(300):
            rid = f"{model}-{role}-{i}"
            champion = DeploymentRole.champion
            log.append(InferenceRecord(rid, model, 1, champion, None, {}, [i % 2], 200, 1.0, at))
            arm_id = rid if role is DeploymentRole.shadow else f"{rid}-c"
            log.append(InferenceRecord(arm_id, model, arm, role, None, {}, [i % 2], 200, 1.0, at))
        log.close()


@pytest.fixture(scope="module")
def world(
    mlflow: MlflowServer,
    forkserver: multiprocessing.context.ForkServerContext,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    root = tmp_path_factory.mktemp("kill")
    version, run_id = register_sklearn_model(mlflow.url, "kill-seed", log_reference=False)
    seed = MlflowClient(mlflow.url).get_model_version("kill-seed", str(version))
    # Its artifact stays; the registered model goes, or every reconcile would intake it.
    MlflowClient(mlflow.url).delete_registered_model("kill-seed")
    events = EventRecorder()
    dbs = Databases(root)
    (root / "log").mkdir()
    (root / "traces").mkdir()
    with WireServer(FakeKube()) as kube:
        w = World(
            dbs=dbs,
            mlflow=mlflow,
            registry=MlflowRegistry(mlflow.url),
            kube=kube,
            events=events,
            log_root=root / "log",
            traces=root / "traces",
            ctx=forkserver,
            source=str(seed.source),
            run_id=run_id,
            model_id=str(seed.source).rsplit("/", 1)[1],  # models:/m-<id>: MLflow 3 wants it
        )
        yield w
        w.engine.dispose()
    events.close()
    dbs.close()


# -- where each flow starts -----------------------------------------------------------------
# Each returns the flow to run and its arguments, on a model of its own.


def _champion(w: World, model: str) -> None:
    """v1 of `model` in production, the way the platform puts it there."""
    v1 = w.register(model)
    tid = w.intake(model, v1)
    assert w.approve(tid, ALICE) is TransitionStatus.approved
    w.apply(tid)
    w.report(model, v1)  # no champion yet: the report passes at once
    tid = w.request(model, v1, Stage.canary)
    assert w.approve(tid, ALICE) is TransitionStatus.approved
    w.apply(tid)
    w.report(model, v1)
    tid = w.request(model, v1, Stage.production)
    assert w.approve(tid, ALICE, BOB) is TransitionStatus.approved
    w.apply(tid)


def _in_shadow(w: World, model: str) -> int:
    _champion(w, model)
    v2 = w.register(model)
    tid = w.intake(model, v2)
    assert w.approve(tid, ALICE) is TransitionStatus.approved
    w.apply(tid)
    return v2


def start_intake(w: World, model: str) -> tuple[str, dict[str, Any]]:
    _champion(w, model)
    return "intake", {"model": model, "version": w.register(model)}


def start_promote_to_shadow(w: World, model: str) -> tuple[str, dict[str, Any]]:
    _champion(w, model)
    v2 = w.register(model)
    tid = w.intake(model, v2)
    assert w.approve(tid, ALICE) is TransitionStatus.approved
    return "promote", {"transition_id": tid}


def start_shadow(w: World, model: str) -> tuple[str, dict[str, Any]]:
    v2 = _in_shadow(w, model)
    w.traffic(model, v2, DeploymentRole.shadow)
    # Approved by a person, waiting for the shadow report the flow decides.
    tid = w.request(model, v2, Stage.canary)
    assert w.approve(tid, ALICE) is TransitionStatus.pending
    return "evaluate", {"model": model, "version": v2}


def _in_canary(w: World, model: str) -> int:
    v2 = _in_shadow(w, model)
    w.traffic(model, v2, DeploymentRole.shadow)
    w.report(model, v2)
    tid = w.request(model, v2, Stage.canary)
    assert w.approve(tid, ALICE) is TransitionStatus.approved
    w.apply(tid)
    return v2


def start_canary(w: World, model: str) -> tuple[str, dict[str, Any]]:
    v2 = _in_canary(w, model)
    w.traffic(model, v2, DeploymentRole.challenger)
    tid = w.request(model, v2, Stage.production)
    assert w.approve(tid, ALICE, BOB) is TransitionStatus.pending
    return "evaluate", {"model": model, "version": v2}


def start_promote_to_production(w: World, model: str) -> tuple[str, dict[str, Any]]:
    v2 = _in_canary(w, model)
    w.traffic(model, v2, DeploymentRole.challenger)
    w.report(model, v2)
    tid = w.request(model, v2, Stage.production)
    assert w.approve(tid, ALICE, BOB) is TransitionStatus.approved
    return "promote", {"transition_id": tid}


STARTS: dict[str, Callable[[World, str], tuple[str, dict[str, Any]]]] = {
    "intake": start_intake,
    "promote-shadow": start_promote_to_shadow,
    "shadow": start_shadow,
    "canary": start_canary,
    "promote-production": start_promote_to_production,
}


# -- what must agree, and what an unbroken run leaves ----------------------------------------


def _transitions(s: Any, model: str) -> list[Transition]:
    return list(s.exec(select(Transition).where(Transition.model_name == model)).all())


def check_agreement(w: World, model: str) -> None:
    """The database, MLflow, the Kubernetes objects and the announcements agree."""
    client = MlflowClient(w.mlflow.url)
    with transaction(w.engine, read_only=True) as s:
        stages = {v.version: v.stage for v in versions.list_versions(s, model)}
        endpoint = endpoints.find_endpoint(s, model)
        applied = [t for t in _transitions(s, model) if t.status is TransitionStatus.applied]
        chain = audit.verify(s)
    assert chain.ok, chain
    for version, stage in stages.items():
        tags = client.get_model_version(model, str(version)).tags
        assert tags.get(STAGE_TAG) == stage.value, (model, version, stage, tags)
    aliases = {a: int(v) for a, v in client.get_registered_model(model).aliases.items()}
    holders = {
        alias: v for v, st in stages.items() for s_, alias in REGISTRY_ALIAS.items() if st is s_
    }
    assert aliases == holders, (model, aliases, holders)
    served = {d.version for d in w.plane.backend.list() if d.model == model}
    wanted = set() if endpoint is None else endpoint.spec.versions()
    assert served == wanted, (model, served, wanted)
    assert endpoint is None or endpoint.converged, (model, endpoint)
    for t in applied:  # each announced once its endpoint served it (the ids: in `outcome`)
        assert t.announced_at is not None, (model, t.id)


def outcome(w: World, model: str) -> dict[str, Any]:
    """What a run left behind, with the model's name and ids taken out, to compare runs."""
    with transaction(w.engine, read_only=True) as s:
        ts = _transitions(s, model)
        ids = {t.id for t in ts}
        order = {t.id: f"v{t.version}:{t.from_stage}->{t.to_stage}" for t in ts}
        reports = s.exec(select(Evaluation).where(Evaluation.model_name == model)).all()
        rows = s.exec(select(AuditEntry)).all()
        endpoint = endpoints.find_endpoint(s, model)
        stages = {v.version: v.stage.value for v in versions.list_versions(s, model)}
    mine = [
        r
        for r in rows
        if r.entity_id == model or r.entity_id.startswith(f"{model}/") or r.entity_id in ids
    ]
    # Distinct event ids: Prefect drops a repeat of an id it has seen. `approved` only
    # triggers promote, and reconcile applies an approval whose event was lost: it may be
    # missing, but never sent twice.
    distinct = {
        e["id"]: e for e in w.events.events if e["resource"].get("stagegate.model.name") == model
    }
    events: Counter[tuple[str, str]] = Counter()
    for e in distinct.values():
        events[(e["event"], order.get(e["payload"].get("transition_id", ""), "-"))] += 1
    assert all(n == 1 for n in events.values()), events
    events = Counter({k: n for k, n in events.items() if k[0] != "stagegate.transition.approved"})
    return {
        "stages": stages,
        "transitions": sorted(
            (order[t.id], t.status.value, t.announced_at is not None) for t in ts
        ),
        "reports": sorted((r.version, r.kind, r.passed) for r in reports),
        "audit": sorted(Counter(r.action for r in mine).items()),
        "endpoint": None
        if endpoint is None
        else (sorted(endpoint.spec.versions()), endpoint.converged),
        "served": sorted(d.version for d in w.plane.backend.list() if d.model == model),
        "events": sorted(events.items()),
    }


# -- the campaign -------------------------------------------------------------------------


@dataclass
class Start:
    """A flow's starting state, built once through the real steps and saved: the database
    (as a template), the model's MLflow versions and the Kubernetes objects."""

    model: str
    flow: str
    args: dict[str, Any]
    template: str
    versions: int
    kube: dict[Any, Any]


def prepare(w: World, start: str) -> Start:
    model = start  # one model per flow: every run of that flow starts from the same state
    client = MlflowClient(w.mlflow.url)
    for other in client.search_registered_models():  # the other flows' models: out of the way
        client.delete_registered_model(other.name)
    template = f"kill_{start.replace('-', '_')}"
    w.use(w.dbs.copy("kill_empty", template))
    flow, args = STARTS[start](w, model)
    w.engine.dispose()  # a template must have no one connected
    registered = len(client.search_model_versions(f"name = '{model}'"))
    return Start(model, flow, args, template, registered, copy.deepcopy(w.kube.fake.objects))


def restore(w: World, s: Start, name: str) -> None:
    """Put back the saved state, in a database of its own called `name`."""
    w.use(w.dbs.copy(s.template, name))
    client = MlflowClient(w.mlflow.url)
    client.delete_registered_model(s.model)
    client.create_registered_model(s.model)
    for _ in range(s.versions):
        client.create_model_version(
            s.model, w.source, run_id=w.run_id, model_id=w.model_id, await_creation_for=0
        )
    with transaction(w.engine, read_only=True) as session:
        stages = [(v.version, v.stage) for v in versions.list_versions(session, s.model)]
    for version, stage in stages:
        w.registry.mirror_stage(s.model, version, stage)
    w.kube.fake.objects = copy.deepcopy(s.kube)
    w.events.events.clear()


@pytest.mark.parametrize("start", list(STARTS))
def test_a_run_killed_at_any_point_ends_where_an_unbroken_run_ends(
    world: World, start: str
) -> None:
    saved = prepare(world, start)
    flow, args, model = saved.flow, saved.args, saved.model
    # The unbroken run: what every broken one must end up as.
    restore(world, saved, f"kill_{start}_ref".replace("-", "_"))
    points = world.run(flow, args, kill_at=None, tag=f"{start}-ref")
    assert world.run("reconcile", {}, kill_at=None, tag=f"{start}-ref-rc") >= 1
    check_agreement(world, model)
    expected = outcome(world, model)
    assert points >= 2  # at least one effect, plus the end

    fates = []
    for k in range(1, points + 1):
        tag = f"{start}-k{k}"
        restore(world, saved, f"kill_{start}_{k}".replace("-", "_"))
        runs = [world.run(flow, args, kill_at=k, tag=f"{tag}-{i}") for i in range(KILLS)]
        assert runs[0] == -1, f"{tag}: the first run should die at point {k}"
        world.run("reconcile", {}, kill_at=None, tag=f"{tag}-rc")
        check_agreement(world, model)
        assert outcome(world, model) == expected, f"{tag}: killed at point {k}"
        world.run(flow, args, kill_at=None, tag=f"{tag}-again")
        assert outcome(world, model) == expected, f"{tag}: the retry after reconcile changed it"
        fates.append(runs)
    labels = (world.traces / f"{start}-ref.trace").read_text().split()[1::2]
    print(f"{start}: {points} points {labels}; the runs per point (-1: killed): {fates}")
