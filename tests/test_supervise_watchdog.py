"""The watchdog of `supervise/`, against real processes (toy services, no Stagegate stack)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from stagegate import supervise
from stagegate.cli import app
from stagegate.errors import InvalidInput
from stagegate.settings import get_settings
from stagegate.supervise import HealthCheck, ServiceSpec, WatchPolicy
from tests.fixtures.mlflow_server import free_port
from tests.waits import gone, wait_for

pytestmark = pytest.mark.slow

PY = sys.executable
FAST = WatchPolicy(poll_s=0.2, backoff_base_s=0.2, backoff_cap_s=1.0, max_restarts=3)


def web_spec(name: str, port: int, depends_on: tuple[str, ...] = ()) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        argv=[PY, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        health_check=HealthCheck(url=f"http://127.0.0.1:{port}/"),
        depends_on=depends_on,
        url=f"http://127.0.0.1:{port}",
        port=port,
    )


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    """A private supervisor root; whatever the test left running is stopped afterwards."""
    yield tmp_path / "home"
    supervise.down(tmp_path / "home", timeout_s=2)


def restarted(root: Path, name: str, old_pid: int | None) -> supervise.ServiceStatus | None:
    # A restart replaces the service's record, so a read may briefly not find it.
    now = supervise.status(root).get(name)
    return now if now and now.healthy and now.pid not in (None, old_pid) else None


def given_up(root: Path, name: str) -> str | None:
    """The reason the watchdog gave `name` up, once it has (read like `restarted`)."""
    now = supervise.status(root).get(name)
    return now.failed if now else None


def test_a_killed_service_is_restarted_with_the_default_policy(root: Path) -> None:
    port = free_port()
    specs = [web_spec("web", port)]
    first = supervise.up(root, specs, timeout_s=20)["web"]
    dog = supervise.watch(root, specs)  # the default policy: 2 s polls, 1 s first backoff
    assert dog.running
    assert dog.healthy
    assert first.pid is not None
    assert first.restarts == 0

    os.killpg(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    now = wait_for("web to come back", lambda: restarted(root, "web", first.pid), 20, 0.1)
    elapsed = time.monotonic() - killed_at

    print(f"restarted and healthy {elapsed:.1f} s after SIGKILL")  # shown with -s
    assert elapsed < 8  # a 2 s poll, a 1 s backoff, and the start itself
    assert now.restarts == 1
    assert now.last_restart_at is not None
    assert now.last_restart_reason is not None
    assert now.failed is None
    assert answers(port)
    watchdog_log = (root / "logs" / "watchdog.log").read_text()
    assert "web: restart 1" in watchdog_log
    # The plan holds the specs' environments, which may carry secrets.
    assert stat.S_IMODE((root / "run" / "watchdog.plan").stat().st_mode) == 0o600

    # A second crash: the watchdog started this one, so it knows how it died.
    assert now.pid is not None
    os.killpg(now.pid, signal.SIGKILL)
    again = wait_for("web to come back again", lambda: restarted(root, "web", now.pid), 20, 0.1)
    assert again.restarts == 2
    assert again.last_restart_reason == "killed by SIGKILL"

    # `stagegate status` reads the same pid files: a restarts column, and the JSON fields.
    runner = CliRunner()
    get_settings.cache_clear()
    try:
        table = runner.invoke(app, ["status"], env={"STAGEGATE_HOME": str(root), "COLUMNS": "200"})
        doc = runner.invoke(app, ["status", "--json"], env={"STAGEGATE_HOME": str(root)})
    finally:
        get_settings.cache_clear()
    assert table.exit_code == 0, table.output
    assert "restarts" in table.output
    web_row = next(line for line in table.output.splitlines() if " web " in line)
    assert f" {again.pid} " in web_row
    assert " 2 " in web_row
    assert "web: last restarted" in table.output
    watchdog_row = next(line for line in table.output.splitlines() if " watchdog " in line)
    assert str(dog.pid) in watchdog_row
    assert json.loads(doc.output)["web"]["restarts"] == 2


def test_a_crash_loop_is_given_up_with_the_reason_and_the_log_tail(root: Path) -> None:
    started_file = root / "starts"
    code = (
        "import sys, time; open(sys.argv[1], 'a').write('x');"
        "print('boom: the config is broken', flush=True);"
        "time.sleep(float(open(sys.argv[2]).read()))"
    )
    # It lives long enough for `up` to call it healthy, then every start dies at once.
    delay = root / "delay"
    root.mkdir(parents=True)
    delay.write_text("1.5")
    spec = ServiceSpec(
        name="crashy", argv=[PY, "-c", code, str(started_file), str(delay)]
    )  # no health check: healthy while it lives
    supervise.up(root, [spec], timeout_s=20)
    delay.write_text("0")
    supervise.watch(root, [spec], policy=FAST)

    failed = wait_for("crashy to be given up", lambda: given_up(root, "crashy"), 30, 0.1)

    st = supervise.status(root)["crashy"]
    assert st.restarts == FAST.max_restarts
    assert not st.running
    assert f"gave up after {FAST.max_restarts} restarts within 300 s" in failed
    assert "exited with code 0" in failed
    assert "boom: the config is broken" in failed
    starts = len(started_file.read_text())
    assert starts == 1 + FAST.max_restarts
    # Given up means given up: no further start, while the watchdog keeps running.
    time.sleep(FAST.poll_s * 10)
    assert len(started_file.read_text()) == starts
    assert supervise.watchdog_status(root).running
    assert supervise.status(root)["crashy"].failed == failed


def test_backoff_doubles_per_restart(root: Path) -> None:
    policy = WatchPolicy(poll_s=0.1, backoff_base_s=0.4, backoff_cap_s=10, max_restarts=3)
    assert [policy.delay_s(n) for n in range(4)] == [0.4, 0.8, 1.6, 3.2]
    assert WatchPolicy().delay_s(10) == 60  # the cap
    stamps = root / "stamps"
    code = "import sys, time; open(sys.argv[1], 'a').write(f'{time.time()}\\n')"
    spec = ServiceSpec(name="blip", argv=[PY, "-c", code + "; time.sleep(1)", str(stamps)])
    supervise.up(root, [spec], timeout_s=20)
    dying = spec.model_copy(update={"argv": [PY, "-c", code, str(stamps)]})
    supervise.watch(root, [dying], policy=policy)

    wait_for("blip to be given up", lambda: given_up(root, "blip"), 30, 0.1)

    times = [float(line) for line in stamps.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]
    assert len(times) == 4  # `up`, then three restarts
    # Each gap: the backoff, plus up to one poll and a Python start-up.
    assert gaps[0] >= 0.8
    assert gaps[1] >= 1.6


def test_down_stops_the_watchdog_first_and_nothing_comes_back(root: Path) -> None:
    ports = free_port(), free_port(), free_port()
    specs = [web_spec("db", ports[0]), web_spec("app", ports[1], depends_on=("db",))]
    started = supervise.up(root, specs, timeout_s=20)
    dog = supervise.watch(root, specs, policy=FAST)
    assert dog.pid is not None
    # Started after the watchdog: newest-first order alone would stop it before the watchdog.
    started |= supervise.up(root, [web_spec("late", ports[2])], timeout_s=20)

    stopped = supervise.down(root, timeout_s=5)

    assert stopped[0] == "watchdog"
    assert sorted(stopped[1:]) == ["app", "db", "late"]
    assert gone(dog.pid)
    time.sleep(FAST.poll_s * 10 + FAST.backoff_cap_s)  # long enough for any restart
    assert not list((root / "run").glob("*.json"))
    assert not (root / "run" / "watchdog.plan").exists()
    assert all(not s.running for s in supervise.status(root).values())
    assert not any(answers(p) for p in ports)
    assert all(s.pid is not None and gone(s.pid) for s in started.values())


def test_a_dead_dependency_is_restarted_and_healthy_before_its_dependent(root: Path) -> None:
    ports = free_port(), free_port()
    # The dependency answers its health check only 1.5 s after each start.
    slow_db = web_spec("db", ports[0]).model_copy(
        update={"argv": ["sh", "-c", f"sleep 1.5; exec {PY} -m http.server {ports[0]}"]}
    )
    specs = [slow_db, web_spec("app", ports[1], depends_on=("db",))]
    started = supervise.up(root, specs, timeout_s=20)
    supervise.watch(root, specs, policy=FAST)

    for name in ("app", "db"):  # the dependent dies first, yet comes back second
        pid = started[name].pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
    wait_for("both back", lambda: all(restarted(root, n, started[n].pid) for n in started), 30)

    now = supervise.status(root)
    db_at, app_at = now["db"].started_at, now["app"].started_at
    assert db_at is not None
    assert app_at is not None
    assert (app_at - db_at).total_seconds() >= 1.5  # it waited for the dependency's health
    assert now["db"].restarts == now["app"].restarts == 1


def test_the_watchdog_name_is_reserved(root: Path) -> None:
    with pytest.raises(InvalidInput, match="reserved"):
        supervise.up(root, [web_spec("watchdog", free_port())], timeout_s=5)


def test_a_dead_watchdog_leaves_services_running_and_watch_replaces_it(root: Path) -> None:
    port = free_port()
    specs = [web_spec("web", port)]
    web = supervise.up(root, specs, timeout_s=20)["web"]
    dog = supervise.watch(root, specs, policy=FAST)
    assert dog.pid is not None
    assert web.pid is not None

    os.killpg(dog.pid, signal.SIGKILL)
    wait_for("the watchdog to be gone", lambda: gone(dog.pid or 0), 10)

    assert not supervise.watchdog_status(root).running
    assert supervise.status(root)["web"].healthy  # its services are not its children
    os.killpg(web.pid, signal.SIGKILL)  # nobody restarts this one now...
    wait_for("web to be down", lambda: not supervise.status(root)["web"].running, 10)

    second = supervise.watch(root, specs, policy=FAST)  # ...until a watchdog runs again

    assert second.running
    assert second.pid != dog.pid
    back = wait_for("web to come back", lambda: restarted(root, "web", web.pid), 20, 0.1)
    assert back.restarts == 1
