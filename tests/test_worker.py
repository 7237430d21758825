"""`stagegate worker` against a real Prefect server: warm starts, and crashes that stay local.

The worker serves a test project (its own prefect.yaml and flow file, via
`STAGEGATE_PROJECT_DIR`) as the embedded stack does; runs are created through Prefect's API.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from stagegate import stack, supervise, warm_start
from stagegate.db import make_engine
from stagegate.errors import PermanentError
from stagegate.migrate import upgrade
from stagegate.settings import PrefectSettings, Settings
from stagegate.stack.specs import venv_bin
from tests.factories import Factory
from tests.fixtures.mlflow_server import free_port
from tests.waits import wait_for

REPO = Path(__file__).resolve().parents[1]

FLOW = '''
"""A flow that reports where it runs, or dies the way it is told to."""
import json
import os
import signal
import sys
import threading

from prefect import flow


@flow(name="probe")
def probe(mode: str, out: str) -> None:
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "exit":
        os._exit(3)
    ppid = os.getppid()
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        parent_cmdline = f.read().replace(b"\\0", b" ").decode()
    info = {
        "pid": os.getpid(),
        "ppid": ppid,
        "parent_cmdline": parent_cmdline,
        "parent_threads": len(os.listdir(f"/proc/{ppid}/task")),
        "mlflow_preloaded": "stagegate.registry.mlflow" in sys.modules,
        "env": os.environ.get("PREFECT__DEPLOYMENT_NAME"),
    }
    with open(out, "w") as f:
        json.dump(info, f)
'''

PREFECT_YAML = """
name: worker-test
deployments:
  - name: probe
    entrypoint: probe_flow.py:probe
  - name: yearly
    entrypoint: probe_flow.py:probe
    schedules:
      - cron: "0 0 1 1 *"
  - name: hourly
    entrypoint: probe_flow.py:probe
    schedules:
      - interval: 3600
"""


@dataclass(frozen=True)
class Served:
    settings: Settings
    api: httpx.Client
    worker_pid: int
    out: Path
    deployment_id: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("worker")
    project = root / "project"
    project.mkdir()
    (project / "prefect.yaml").write_text(PREFECT_YAML)
    (project / "probe_flow.py").write_text(textwrap.dedent(FLOW))
    port = free_port()
    settings = Settings(
        home=root / "home",
        prefect=PrefectSettings(port=port, api_url=f"http://127.0.0.1:{port}/api"),
    )
    specs = stack.default_specs(settings, stack.load_secrets(settings))
    prefect_spec = next(s for s in specs if s.name == "prefect")
    worker_spec = supervise.ServiceSpec(
        name="worker",
        argv=[str(venv_bin() / "stagegate"), "worker"],
        env={
            "STAGEGATE_HOME": str(settings.home.resolve()),
            "STAGEGATE_PROJECT_DIR": str(project),
            "PREFECT_API_URL": settings.prefect.api_url,
            "PREFECT_HOME": str(settings.home.resolve() / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            warm_start.MODE_ENV: warm_start.FORKSERVER,
        },
        health_check=supervise.HealthCheck(ready_file=stack.worker_ready_file(settings)),
        depends_on=("prefect",),
    )
    try:
        statuses = supervise.up(settings.home, [prefect_spec, worker_spec], timeout_s=150)
        worker_pid = statuses["worker"].pid
        assert worker_pid is not None
        with httpx.Client(base_url=settings.prefect.api_url, timeout=15, trust_env=False) as api:
            deployment = api.get("/deployments/name/probe/probe")
            assert deployment.status_code == 200, deployment.text
            yield Served(settings, api, worker_pid, root / "out.json", deployment.json()["id"])
    finally:
        supervise.down(settings.home)


def run(served: Served, mode: str) -> dict[str, Any]:
    """Create a run of the probe deployment and wait until it is final; return the run."""
    served.out.unlink(missing_ok=True)
    return run_deployment(served, served.deployment_id, {"mode": mode, "out": str(served.out)})


def run_deployment(
    served: Served, deployment_id: str, parameters: dict[str, Any], timeout_s: float = 60
) -> dict[str, Any]:
    def created() -> httpx.Response | None:
        r = served.api.post(
            f"/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters}
        )
        # Prefect on SQLite answers 503 while its database is locked: a client retries.
        return None if r.status_code == 503 else r

    r = wait_for("Prefect to create the run", created, 30)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]

    def final() -> dict[str, Any] | None:
        doc: dict[str, Any] = served.api.get(f"/flow_runs/{run_id}").json()
        return doc if doc["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED"} else None

    return dict(wait_for(f"run {run_id} {parameters} to end", final, timeout_s))


def alive(pid: int) -> bool:
    """Running, and not a zombie (the worker reaps a dead forkserver only on the next run)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.e2e
def test_runs_start_from_a_preloaded_single_threaded_forkserver(served: Served) -> None:
    done = run(served, "ok")
    assert done["state"]["type"] == "COMPLETED", done["state"]
    info = json.loads(served.out.read_text())
    assert info["ppid"] != served.worker_pid, "forked by the forkserver, not by the worker"
    assert "multiprocessing.forkserver" in info["parent_cmdline"], info
    assert info["parent_threads"] == 1, "the forkserver must be single-threaded when it forks"
    assert info["mlflow_preloaded"], "mlflow was imported once, in the forkserver"
    assert info["env"] == "probe", "the run gets Prefect's environment, not the forkserver's"


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["kill", "exit"])
def test_a_crashing_run_leaves_the_worker_and_the_next_run_alone(served: Served, mode: str) -> None:
    crashed = run(served, mode)
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]
    assert alive(served.worker_pid)
    after = run(served, "ok")
    assert after["state"]["type"] == "COMPLETED", after["state"]
    assert alive(served.worker_pid)


@pytest.mark.e2e
def test_a_killed_forkserver_is_started_again(served: Served) -> None:
    run(served, "ok")
    forkserver = json.loads(served.out.read_text())["ppid"]
    os.kill(forkserver, signal.SIGKILL)
    wait_for("the forkserver to go", lambda: not alive(forkserver) or None, timeout_s=10)
    after = run(served, "ok")
    assert after["state"]["type"] == "COMPLETED", after["state"]
    info = json.loads(served.out.read_text())
    assert info["ppid"] not in (forkserver, served.worker_pid)
    assert "multiprocessing.forkserver" in info["parent_cmdline"]
    assert alive(served.worker_pid)


@pytest.mark.e2e
def test_prefect_deploy_all_on_a_process_pool_runs_a_flow(served: Served, tmp_path: Path) -> None:
    """At scale: prefect.yaml as it is, `prefect deploy --all`, a process worker on `stagegate`."""
    prefect = str(venv_bin() / "prefect")
    env = {
        **os.environ,
        "PREFECT_API_URL": served.settings.prefect.api_url,
        "PREFECT_HOME": str(tmp_path / "prefect-cli"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }

    def cli(*args: str) -> None:
        done = subprocess.run(
            [prefect, *args],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    cli("work-pool", "create", "stagegate", "--type", "process")
    cli("--no-prompt", "deploy", "--all")
    for flow, name in [
        ("intake", "intake"),
        ("promote", "promote"),
        ("evaluate-stage", "shadow"),
        ("evaluate-stage", "canary"),
        ("reconcile", "reconcile"),
    ]:
        doc = served.api.get(f"/deployments/name/{flow}/{name}").json()
        assert doc["work_pool_name"] == "stagegate", doc

    # The shadow flow against a governance database holding one candidate: nothing to
    # evaluate, so it completes without MLflow or a router.
    url = f"sqlite:///{tmp_path / 'governance.db'}"
    upgrade(url)
    engine = make_engine(url)
    Factory(engine).version("scale", 1)
    engine.dispose()
    log = (tmp_path / "process-worker.log").open("wb")
    worker = subprocess.Popen(
        [prefect, "worker", "start", "--pool", "stagegate", "--type", "process"],
        cwd=tmp_path,
        env={
            **env,
            "STAGEGATE_DB__URL": url,
            "STAGEGATE_HOME": str(tmp_path / "home"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        },
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        shadow = served.api.get("/deployments/name/evaluate-stage/shadow").json()["id"]
        done = run_deployment(served, shadow, {"model": "scale", "version": 1}, timeout_s=90)
        assert done["state"]["type"] == "COMPLETED", (
            done["state"],
            (tmp_path / "process-worker.log").read_text()[-3000:],
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=15)
        log.close()


@pytest.mark.e2e
def test_the_worker_serves_cron_and_interval_schedules(served: Served) -> None:
    """prefect.yaml's `cron` (the drift check's) and `interval` (reconcile's) schedules."""
    found = {}
    for name in ("yearly", "hourly"):
        r = served.api.get(f"/deployments/name/probe/{name}")
        assert r.status_code == 200, r.text
        [schedule] = r.json()["schedules"]
        found[name] = schedule["schedule"]
    assert found["yearly"]["cron"] == "0 0 1 1 *"
    assert found["hourly"]["interval"] == 3600


def test_preload_names_the_flows_modules_and_what_they_import_lazily() -> None:
    assert warm_start.entrypoint_module("flows/intake.py:intake") == "flows.intake"
    assert warm_start.entrypoint_module("probe_flow.py:probe") == "probe_flow"
    assert warm_start.entrypoint_module("/abs/flow.py:f") is None
    assert warm_start.entrypoint_module("../up/flow.py:f") is None
    assert warm_start.entrypoint_module("pkg.module:f") is None
    modules = warm_start.preload(["flows/intake.py:intake", "flows/evaluate.py:evaluate_stage"])
    assert modules[: len(warm_start.LAZY_IMPORTS)] == list(warm_start.LAZY_IMPORTS)
    assert {"flows.intake", "flows.evaluate", "stagegate.registry.mlflow"} <= set(modules)


def test_start_mode_refuses_an_unknown_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(warm_start.MODE_ENV, raising=False)
    assert warm_start.start_mode() == warm_start.FORKSERVER
    monkeypatch.setenv(warm_start.MODE_ENV, "spawn")
    assert warm_start.start_mode() == warm_start.SPAWN
    monkeypatch.setenv(warm_start.MODE_ENV, "fork")
    with pytest.raises(PermanentError, match="forkserver or spawn"):
        warm_start.start_mode()
