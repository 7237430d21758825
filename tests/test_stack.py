"""The embedded-stack supervisor, against real (mostly trivial) processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

import stagegate
from stagegate.errors import InvalidInput, PermanentError
from stagegate.settings import Settings
from stagegate.stack import (
    HealthCheck,
    ServiceSpec,
    default_specs,
    down,
    load_secrets,
    status,
    up,
    worker_ready_file,
)
from stagegate.stack.specs import venv_bin
from stagegate.supervise.procfs import group_members, proc_stat, rss_bytes
from tests.fixtures.mlflow_server import free_port
from tests.waits import gone

PY = sys.executable


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """A private home; whatever the test left running is stopped afterwards."""
    settings = Settings(home=tmp_path / "home")
    yield settings
    down(settings, timeout_s=2)


def web_spec(port: int, name: str = "web") -> ServiceSpec:
    return ServiceSpec(
        name=name,
        argv=[PY, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health_check=HealthCheck(url=f"http://127.0.0.1:{port}/"),
        url=f"http://127.0.0.1:{port}",
        port=port,
    )


def spawner_spec(home: Path, *, ignore_term: bool = False) -> ServiceSpec:
    """A shell that forks `sleep 300` (a grandchild of ours) and reports ready by a file."""
    ready = home / "run" / "spawner.ready"
    trap = "trap '' TERM; " if ignore_term else ""
    script = f"{trap}sleep 300 & echo spawned $!; touch {ready}; wait"
    return ServiceSpec(
        name="spawner",
        argv=["sh", "-c", script],
        health_check=HealthCheck(ready_file=ready),
        depends_on=("web",),
    )


def crash_spec(port: int) -> ServiceSpec:
    code = "import sys; print('boom: config key xyz is missing', flush=True); sys.exit(3)"
    return ServiceSpec(
        name="crash",
        argv=[PY, "-c", code],
        health_check=HealthCheck(url=f"http://127.0.0.1:{port}/"),
        depends_on=("web",),
        port=port,
    )


@pytest.mark.slow
def test_up_status_idempotent_down(settings: Settings) -> None:
    port = free_port()
    specs = [spawner_spec(settings.home), web_spec(port)]  # order comes from depends_on
    events: list[str] = []

    started = up(settings, specs=specs, timeout_s=20, on_event=events.append)

    assert list(started) == ["web", "spawner"]
    for name, st in started.items():
        assert st.running, name
        assert st.healthy, name
        assert st.pid is not None
        assert Path(st.log).is_file()
        assert (settings.home / "run" / f"{name}.json").is_file()
    assert started["web"].url == f"http://127.0.0.1:{port}"
    assert httpx.get(f"http://127.0.0.1:{port}/", trust_env=False).status_code == 200
    spawner_pid = started["spawner"].pid
    assert spawner_pid is not None
    group = group_members(spawner_pid)
    assert len(group) == 2  # sh and its `sleep 300`
    assert any("started (pid" in e for e in events)
    assert any("healthy" in e for e in events)

    again = up(settings, specs=specs, timeout_s=20)
    assert {n: s.pid for n, s in again.items()} == {n: s.pid for n, s in started.items()}

    assert sorted(down(settings)) == ["spawner", "web"]
    pids = group + [s.pid for s in started.values() if s.pid is not None]
    assert all(gone(pid) for pid in pids)
    assert not list((settings.home / "run").glob("*.json"))
    assert all(not s.running for s in status(settings, specs=specs).values())
    assert down(settings) == []


@pytest.mark.slow
def test_status_from_another_process_reads_pid_files(settings: Settings) -> None:
    port = free_port()
    started = up(settings, specs=[web_spec(port)], timeout_s=20)
    code = (
        "import json, sys; from stagegate.settings import Settings; "
        "from stagegate.stack import status; "
        "print(json.dumps({n: s.model_dump(mode='json') "
        "for n, s in status(Settings(home=sys.argv[1])).items()}))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(stagegate.__file__).parents[1])}
    out = subprocess.run(
        [PY, "-c", code, str(settings.home)], env=env, check=True, capture_output=True, text=True
    )
    seen = json.loads(out.stdout)

    assert list(seen)[:4] == ["mlflow", "prefect", "api", "worker"]
    assert seen["mlflow"]["running"] is False
    assert seen["mlflow"]["pid"] is None
    assert seen["mlflow"]["url"] == settings.mlflow.tracking_uri
    assert seen["web"]["pid"] == started["web"].pid
    assert seen["web"]["running"] is True
    assert seen["web"]["healthy"] is True
    assert seen["web"]["rss_bytes"] > 0


@pytest.mark.slow
def test_failed_health_check_stops_everything_and_quotes_the_log(settings: Settings) -> None:
    port = free_port()
    specs = [web_spec(port), crash_spec(free_port())]

    with pytest.raises(PermanentError) as caught:
        up(settings, specs=specs, timeout_s=20)

    message = str(caught.value)
    assert "crash exited before becoming healthy (exit code 3)" in message
    assert "boom: config key xyz is missing" in message
    assert str(settings.home / "logs" / "crash.log") in message
    assert not list((settings.home / "run").glob("*.json"))
    assert all(not s.running for s in status(settings, specs=specs).values())
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/", trust_env=False)


@pytest.mark.slow
def test_timeout_names_the_service(settings: Settings) -> None:
    never = ServiceSpec(
        name="never",
        argv=[PY, "-c", "import time; print('still warming up', flush=True); time.sleep(60)"],
        health_check=HealthCheck(url=f"http://127.0.0.1:{free_port()}/"),
    )
    with pytest.raises(PermanentError, match=r"never did not become healthy within 1 s"):
        up(settings, specs=[never], timeout_s=1)
    assert not status(settings, specs=[never])["never"].running
    assert "still warming up" in (settings.home / "logs" / "never.log").read_text()


def test_port_taken_by_a_stranger_is_refused(settings: Settings) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        with pytest.raises(PermanentError, match=f"port {port} .* already in use"):
            up(settings, specs=[web_spec(port)], timeout_s=10)
    assert not (settings.home / "run" / "web.json").exists()


@pytest.mark.slow
def test_stale_pid_files_are_replaced(settings: Settings) -> None:
    port = free_port()
    spec = web_spec(port)
    run = settings.home / "run"
    run.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = proc_stat(os.getpid())
    assert me is not None
    for pid, ticks in [(dead.pid, 1), (os.getpid(), me.start_ticks + 1)]:
        # Second case: our own pid with another start time stands for a reused pid.
        record = {
            "name": "web",
            "pid": pid,
            "pgid": pid,
            "start_ticks": ticks,
            "argv": spec.argv,
            "url": spec.url,
            "started_at": "2026-01-01T00:00:00Z",
            "log": str(settings.home / "logs" / "web.log"),
            "log_offset": 0,
            "health_check": {"url": spec.health_check.url},
        }
        (run / "web.json").write_text(json.dumps(record))
        assert not status(settings, specs=[spec])["web"].running

        result = up(settings, specs=[spec], timeout_s=20)

        assert result["web"].healthy
        assert result["web"].pid not in (pid, None)
        assert down(settings) == ["web"]
    assert proc_stat(os.getpid()) is not None  # the reused pid was not signalled


@pytest.mark.slow
def test_down_kills_a_group_that_ignores_sigterm(settings: Settings) -> None:
    specs = [web_spec(free_port()), spawner_spec(settings.home, ignore_term=True)]
    started = up(settings, specs=specs, timeout_s=20)
    pid = started["spawner"].pid
    assert pid is not None
    members = group_members(pid)
    assert rss_bytes(members) > 0

    begun = time.monotonic()
    assert sorted(down(settings, timeout_s=0.5)) == ["spawner", "web"]
    assert time.monotonic() - begun < 5
    assert all(gone(p) for p in members)


@pytest.mark.slow
def test_down_reaps_orphans_of_a_dead_leader(settings: Settings) -> None:
    specs = [web_spec(free_port()), spawner_spec(settings.home)]
    started = up(settings, specs=specs, timeout_s=20)
    leader = started["spawner"].pid
    assert leader is not None
    orphans = [p for p in group_members(leader) if p != leader]
    os.kill(leader, signal.SIGKILL)  # the `sleep 300` is left behind in the group
    deadline = time.monotonic() + 5
    while not gone(leader) and time.monotonic() < deadline:
        status(settings, specs=specs)  # reaps our child
        time.sleep(0.05)

    assert status(settings, specs=specs)["spawner"].running is False
    assert "spawner" in down(settings)
    assert orphans
    assert all(gone(p) for p in orphans)


def test_unknown_service_is_refused(settings: Settings) -> None:
    with pytest.raises(InvalidInput, match="unknown service"):
        up(settings, specs=[web_spec(free_port())], services=["nope"])


def test_secrets_are_created_once_private_and_reused(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    first = load_secrets(settings)
    path = tmp_path / "home" / "secrets.json"

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.webhook_secret) >= 40
    Fernet(first.mlflow_fernet_key.encode())  # a valid key
    assert load_secrets(Settings(home=tmp_path / "home")) == first
    assert load_secrets(Settings(home=tmp_path / "other")) != first


def test_default_specs_wire_secrets_ports_and_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(home=tmp_path, api={"port": 9999}, lifecycle={"stale_transition_s": 7})
    secrets = load_secrets(settings)
    specs = {s.name: s for s in default_specs(settings, secrets)}

    assert list(specs) == ["mlflow", "prefect", "api", "worker", "router"]
    assert specs["api"].depends_on == ("mlflow", "prefect")
    assert "--workers" not in specs["api"].argv  # one process unless the settings say more
    assert "api" in specs["worker"].depends_on
    mlflow_env = specs["mlflow"].env
    assert mlflow_env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] == secrets.mlflow_fernet_key
    assert mlflow_env["PATH"].startswith(f"{venv_bin()}{os.pathsep}")
    assert f"sqlite:///{tmp_path}/mlflow/mlflow.db" in specs["mlflow"].argv
    assert specs["mlflow"].health_check.url == f"{settings.mlflow.tracking_uri}/health"
    prefect_env = specs["prefect"].env
    assert prefect_env["PREFECT_HOME"] == str(tmp_path / "prefect")
    assert prefect_env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    api_env = specs["api"].env
    assert api_env["STAGEGATE_WEBHOOK__SECRET"] == secrets.webhook_secret
    assert api_env["STAGEGATE_DB__URL"] == settings.database_url
    assert api_env["STAGEGATE_HOME"] == str(tmp_path)
    assert api_env["PREFECT_API_URL"] == settings.prefect.api_url
    # The worker polls as its settings say (Prefect's own setting takes whole seconds only).
    assert specs["worker"].env["STAGEGATE_PREFECT__RUNNER_POLL_S"] == "1.0"
    assert "PREFECT_RUNNER_POLL_FREQUENCY" not in specs["worker"].env
    assert specs["worker"].health_check.ready_file == worker_ready_file(settings)
    assert worker_ready_file(settings) == tmp_path / "run" / "worker.ready"

    # The children rebuild the very same settings from their environment.
    for key, value in api_env.items():
        if key.startswith("STAGEGATE_"):
            monkeypatch.setenv(key, value)
    rebuilt = Settings()
    assert rebuilt.api.port == 9999
    assert rebuilt.lifecycle.stale_transition_s == 7
    assert rebuilt.webhook.secret == secrets.webhook_secret
    assert rebuilt.alerts.secret == secrets.alert_secret  # generated for the stack
    assert rebuilt.model_dump(exclude={"webhook", "db", "alerts"}) == settings.model_dump(
        exclude={"webhook", "db", "alerts"}
    )
    monkeypatch.undo()

    mismatch = Settings(home=tmp_path, mlflow={"port": 1234})
    with pytest.raises(PermanentError, match="same port"):
        default_specs(mismatch, secrets)


def test_api_workers_reach_uvicorn(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, api={"workers": 3})
    api = next(s for s in default_specs(settings, load_secrets(settings)) if s.name == "api")
    assert api.argv[api.argv.index("--workers") + 1] == "3"


@pytest.mark.e2e
def test_real_mlflow_and_prefect_start_and_stop_cleanly(tmp_path: Path) -> None:
    mlflow_port, prefect_port = free_port(), free_port()
    settings = Settings(
        home=tmp_path / "home",
        mlflow={"port": mlflow_port, "tracking_uri": f"http://127.0.0.1:{mlflow_port}"},
        prefect={"port": prefect_port, "api_url": f"http://127.0.0.1:{prefect_port}/api"},
    )
    members: list[int] = []
    try:
        begun = time.monotonic()
        started = up(settings, services=["mlflow", "prefect"], timeout_s=90)
        elapsed = time.monotonic() - begun

        assert set(started) == {"mlflow", "prefect"}
        with httpx.Client(trust_env=False) as client:
            assert client.get(f"http://127.0.0.1:{mlflow_port}/health").status_code == 200
            assert client.get(f"http://127.0.0.1:{prefect_port}/api/health").status_code == 200
        members = [p for s in started.values() if s.pid for p in group_members(s.pid)]
        print(  # measurements, shown with -s
            f"up {elapsed:.1f}s; "
            + ", ".join(f"{n} rss {(s.rss_bytes or 0) / 2**20:.0f} MiB" for n, s in started.items())
        )
        assert (tmp_path / "home" / "mlflow" / "mlflow.db").exists()
        assert (tmp_path / "home" / "prefect" / "prefect.db").exists()
    finally:
        stopped = down(settings)
    assert sorted(stopped) == ["mlflow", "prefect"]
    assert all(gone(p) for p in members)
