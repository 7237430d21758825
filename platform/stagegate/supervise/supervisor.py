"""Start, health-check, report and stop services as detached process groups.

State lives under a root folder: `run/{name}.json` (pid files), `logs/{name}.log`. The
embedded stack (`stack/`) and the local serving backend each keep their own root. A root may
also hold a watchdog (`watchdog.py`), recorded like a service under the reserved name
`watchdog`; `down` stops it first.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pydantic import BaseModel, Field, ValidationError

from stagegate.errors import InvalidInput, PermanentError
from stagegate.supervise import procfs as procs
from stagegate.supervise.spec import HealthCheck, ServiceSpec

LOG_TAIL_LINES = 30
_POLL_S = 0.2
_HTTP_TIMEOUT_S = 2.0
WATCHDOG = "watchdog"  # reserved: the record of the root's watchdog process
# Children started by this process, kept so they can be reaped (no zombies, no warnings).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class ServiceStatus(BaseModel):
    name: str
    url: str | None = None
    pid: int | None = None
    running: bool = False
    healthy: bool = False
    log: str
    started_at: datetime | None = None
    rss_bytes: int | None = Field(default=None, description="Summed over the process group.")
    restarts: int = Field(default=0, description="Restarts by the watchdog since `up`.")
    last_restart_at: datetime | None = None
    last_restart_reason: str | None = None
    failed: str | None = Field(
        default=None, description="Why the watchdog gave up on it (with the log tail)."
    )


class RestartHistory(BaseModel):
    """What the watchdog did to a service since `up` started it."""

    count: int = 0
    last_at: datetime | None = None
    last_reason: str | None = None
    recent: list[datetime] = Field(
        default_factory=list, description="Restart times inside the crash-loop window."
    )


class ServiceRecord(BaseModel):
    """The pid file: enough to find, check and stop a service from another process."""

    name: str
    pid: int
    pgid: int
    start_ticks: int = Field(description="From /proc/PID/stat: tells a reused pid apart.")
    argv: list[str]
    url: str | None
    started_at: datetime
    log: str
    log_offset: int = Field(description="Where this run's output begins in the log.")
    health_check: HealthCheck
    restarts: RestartHistory = Field(default_factory=RestartHistory)
    failed: str | None = Field(default=None, description="Set when the watchdog gave up.")


class _Dirs:
    def __init__(self, root: Path) -> None:
        self.home = root.resolve()
        self.run = self.home / "run"
        self.logs = self.home / "logs"
        self.watch_plan = self.run / "watchdog.plan"

    def record(self, name: str) -> Path:
        return self.run / f"{name}.json"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


# -- public API ---------------------------------------------------------------------------


def up(
    root: Path,
    specs: Sequence[ServiceSpec],
    *,
    services: Sequence[str] | None = None,
    timeout_s: float = 120,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, ServiceStatus]:
    """Start what is not running yet, in dependency waves, and wait until all are healthy.

    `services` picks a subset (their dependencies come along). `timeout_s` bounds the whole
    call. On failure everything this call started is stopped and `PermanentError` names the
    service and quotes its log.
    """
    emit = on_event or (lambda _msg: None)
    chosen = _select(list(specs), services)
    dirs = _Dirs(root)
    for folder in (dirs.run, dirs.logs):
        folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    started: list[ServiceRecord] = []
    with _lock(dirs):
        try:
            healthy: set[str] = set()
            remaining = list(chosen)
            while remaining:
                wave = [s for s in remaining if set(s.depends_on) <= healthy]
                waiting = []
                for spec in wave:
                    record = _adopt_or_clean(dirs, spec, emit)
                    if record is None:
                        record = _start(dirs, spec, emit)
                        started.append(record)
                    elif _healthy(record):
                        emit(f"{spec.name} already running (pid {record.pid})")
                        healthy.add(spec.name)
                        continue
                    waiting.append(record)
                _wait_healthy(waiting, deadline, timeout_s, emit)
                healthy.update(spec.name for spec in wave)
                remaining = [s for s in remaining if s.name not in healthy]
        except BaseException:
            for record in reversed(started):
                emit(f"stopping {record.name}")
                _stop(dirs, record, timeout_s=5)
            raise
    current = status(root, {s.name: s.url for s in chosen})
    return {spec.name: current[spec.name] for spec in chosen}


def down(root: Path, *, timeout_s: float = 15, names: Sequence[str] | None = None) -> list[str]:
    """Stop recorded services (all, or `names`), newest first; returns the names stopped."""
    dirs = _Dirs(root)
    if not dirs.run.is_dir():
        return []
    stopped = []
    with _lock(dirs):
        records = sorted(_read_records(dirs).values(), key=lambda r: r.started_at, reverse=True)
        # The watchdog first, so it never restarts what is being stopped.
        records.sort(key=lambda r: r.name != WATCHDOG)
        for record in records:
            if names is not None and record.name not in names:
                continue
            if _stop(dirs, record, timeout_s=timeout_s):
                stopped.append(record.name)
        if names is None or WATCHDOG in names:
            dirs.watch_plan.unlink(missing_ok=True)
    return stopped


def status(root: Path, urls: dict[str, str | None] | None = None) -> dict[str, ServiceStatus]:
    """Each service's state, read from the pid files (works from any process).

    `urls` names the services expected (listed even when stopped) and where users reach them.
    The watchdog is not a service: it is listed only when `urls` names it (see `watch`).
    """
    dirs = _Dirs(root)
    urls = dict(urls or {})
    records = _read_records(dirs) if dirs.run.is_dir() else {}
    names = list(urls) + [name for name in records if name not in urls and name != WATCHDOG]
    return {name: _status(dirs, name, records.get(name), urls.get(name)) for name in names}


def _status(dirs: _Dirs, name: str, record: ServiceRecord | None, url: str | None) -> ServiceStatus:
    if record is None:
        return ServiceStatus(name=name, url=url, log=str(dirs.log(name)))
    history = {
        "restarts": record.restarts.count,
        "last_restart_at": record.restarts.last_at,
        "last_restart_reason": record.restarts.last_reason,
        "failed": record.failed,
    }
    if not _alive(record):
        return ServiceStatus(name=name, url=url or record.url, log=record.log, **history)
    return ServiceStatus(
        name=name,
        url=record.url,
        pid=record.pid,
        running=True,
        healthy=_healthy(record),
        log=record.log,
        started_at=record.started_at,
        rss_bytes=procs.rss_bytes(procs.group_members(record.pgid)),
        **history,
    )


# -- selection ----------------------------------------------------------------------------


def _select(specs: list[ServiceSpec], services: Sequence[str] | None) -> list[ServiceSpec]:
    """The requested specs plus their dependencies, in the given order; refuses cycles."""
    by_name = {s.name: s for s in specs}
    if WATCHDOG in by_name:
        raise InvalidInput(f"the service name {WATCHDOG!r} is reserved for the watchdog")
    for spec in specs:
        missing = [d for d in spec.depends_on if d not in by_name]
        if missing:
            raise InvalidInput(f"{spec.name} depends on unknown services: {missing}")
    wanted = set(by_name) if services is None else set()
    todo = list(services or [])
    while todo:
        name = todo.pop()
        if name not in by_name:
            raise InvalidInput(f"unknown service {name!r}; known: {sorted(by_name)}")
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].depends_on)
    order: list[str] = []
    while len(order) < len(wanted):
        ready = [
            s.name
            for s in specs
            if s.name in wanted and s.name not in order and set(s.depends_on) <= set(order)
        ]
        if not ready:
            raise InvalidInput(f"dependency cycle among {sorted(wanted - set(order))}")
        order.extend(ready)
    return [by_name[name] for name in order]


# -- records ------------------------------------------------------------------------------


@contextmanager
def _lock(dirs: _Dirs) -> Iterator[None]:
    """Serialise `up`/`down` on one home (two `up`s must not both start a service)."""
    dirs.run.mkdir(parents=True, exist_ok=True)
    with open(dirs.run / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _try_lock(dirs: _Dirs) -> Iterator[bool]:
    """The same lock without waiting: yields False while an `up` or `down` holds it."""
    with open(dirs.run / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_records(dirs: _Dirs) -> dict[str, ServiceRecord]:
    records = {}
    for path in sorted(dirs.run.glob("*.json")):
        try:
            record = ServiceRecord.model_validate_json(path.read_bytes())
        except (OSError, ValidationError):
            continue  # half-written or foreign: ignored, `up` overwrites it
        records[record.name] = record
    return records


def _write_record(dirs: _Dirs, record: ServiceRecord) -> None:
    path = dirs.record(record.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    tmp.replace(path)


# -- process identity and health ----------------------------------------------------------


def _is_ours(record: ServiceRecord) -> bool:
    """The recorded leader still exists (maybe as a zombie) and is the process we started."""
    stat = procs.proc_stat(record.pid)
    return stat is not None and stat.start_ticks == record.start_ticks


def _alive(record: ServiceRecord) -> bool:
    child = _CHILDREN.get(record.pid)
    if child is not None and child.poll() is not None:  # poll() reaps it
        return False
    stat = procs.proc_stat(record.pid)
    return stat is not None and stat.start_ticks == record.start_ticks and not stat.zombie


def _healthy(record: ServiceRecord) -> bool:
    if not _alive(record):
        return False
    check = record.health_check
    if check.ready_file is not None:
        try:
            touched = check.ready_file.stat().st_mtime
        except FileNotFoundError:
            return False
        if touched < record.started_at.timestamp() - 1:
            return False
    if check.url is not None:
        try:
            with httpx.Client(trust_env=False, timeout=_HTTP_TIMEOUT_S) as client:
                return client.get(check.url).status_code == 200
        except httpx.HTTPError:
            return False
    return True


def _adopt_or_clean(
    dirs: _Dirs, spec: ServiceSpec, emit: Callable[[str], None]
) -> ServiceRecord | None:
    """The live record of `spec`, or None after removing a stale one (and its leftovers)."""
    path = dirs.record(spec.name)
    if not path.exists():
        return None
    try:
        record = ServiceRecord.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        path.unlink(missing_ok=True)
        return None
    if _alive(record):
        return record
    emit(f"{spec.name}: removing stale pid file (pid {record.pid} is gone)")
    _stop(dirs, record, timeout_s=5)
    return None


# -- start and stop -----------------------------------------------------------------------


def _start(
    dirs: _Dirs,
    spec: ServiceSpec,
    emit: Callable[[str], None],
    restarts: RestartHistory | None = None,
) -> ServiceRecord:
    if spec.port is not None:
        try:
            taken = procs.port_in_use(spec.host, spec.port)
        except OSError as exc:
            raise PermanentError(
                f"{spec.name}: cannot bind {spec.host}:{spec.port}: {exc}"
            ) from exc
        if taken:
            raise PermanentError(
                f"{spec.name}: port {spec.port} on {spec.host} is already in use by a process "
                "Stagegate did not start; stop it or configure another port"
            )
    if spec.health_check.ready_file is not None:
        spec.health_check.ready_file.unlink(missing_ok=True)
    log_path = dirs.log(spec.name)
    started_at = datetime.now(UTC)
    with open(log_path, "ab") as log:
        offset = log.seek(0, os.SEEK_END)
        log.write(
            f"\n=== stagegate: starting {spec.name} at {started_at.isoformat()} ===\n"
            f"$ {shlex.join(spec.argv)}\n".encode()
        )
        log.flush()
        try:
            child = subprocess.Popen(
                spec.argv,
                env={**os.environ, **spec.env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise PermanentError(f"{spec.name}: cannot start {spec.argv[0]}: {exc}") from exc
    _CHILDREN[child.pid] = child
    stat = procs.proc_stat(child.pid)
    record = ServiceRecord(
        name=spec.name,
        pid=child.pid,
        pgid=child.pid,  # start_new_session: the child leads its own session and group
        start_ticks=stat.start_ticks if stat is not None else -1,
        argv=spec.argv,
        url=spec.url,
        started_at=started_at,
        log=str(log_path),
        log_offset=offset,
        health_check=spec.health_check,
        restarts=restarts or RestartHistory(),
    )
    _write_record(dirs, record)
    emit(f"{spec.name}: started (pid {child.pid}), log {log_path}")
    return record


def _wait_healthy(
    records: list[ServiceRecord],
    deadline: float,
    timeout_s: float,
    emit: Callable[[str], None],
) -> None:
    pending = {r.name: r for r in records}
    begun = time.monotonic()
    while pending:
        for name, record in list(pending.items()):
            if _healthy(record):
                emit(f"{name}: healthy after {time.monotonic() - begun:.1f} s")
                del pending[name]
            elif not _alive(record):
                raise PermanentError(_failure(record, f"{name} exited before becoming healthy"))
        if pending and time.monotonic() >= deadline:
            name, record = next(iter(pending.items()))
            raise PermanentError(
                _failure(record, f"{name} did not become healthy within {timeout_s:g} s")
            )
        if pending:
            time.sleep(_POLL_S)


def _failure(record: ServiceRecord, reason: str) -> str:
    child = _CHILDREN.get(record.pid)
    if child is not None and child.returncode is not None:
        reason += f" (exit code {child.returncode})"
    return f"{reason}. Last lines of {record.log}:\n{_log_tail(record)}"


def _log_tail(record: ServiceRecord, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(record.log, "rb") as fh:
            fh.seek(record.log_offset)
            text = fh.read().decode(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _stop(dirs: _Dirs, record: ServiceRecord, *, timeout_s: float) -> bool:
    """SIGTERM the record's process group, SIGKILL it after `timeout_s`, drop the pid file.

    Returns whether anything of ours was still running. A process group id stays allocated
    while any member lives, so members of the recorded group are ours unless the leader's
    pid now belongs to a different process.
    """
    leader = procs.proc_stat(record.pid)
    ours = leader is None or leader.start_ticks == record.start_ticks
    was_running = ours and (_alive(record) or bool(procs.group_members(record.pgid)))
    if was_running:
        _signal_group(record, signal.SIGTERM)
        if not _wait_group_gone(record, timeout_s):
            _signal_group(record, signal.SIGKILL)
            _wait_group_gone(record, 5)
    child = _CHILDREN.get(record.pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[record.pid]
    dirs.record(record.name).unlink(missing_ok=True)
    if record.health_check.ready_file is not None:
        record.health_check.ready_file.unlink(missing_ok=True)
    return was_running


def _signal_group(record: ServiceRecord, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pgid, sig)


def _wait_group_gone(record: ServiceRecord, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        child = _CHILDREN.get(record.pid)
        if child is not None:
            child.poll()
        if not procs.group_members(record.pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
