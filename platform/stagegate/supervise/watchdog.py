"""Keep a root's services alive: a detached watchdog restarts those whose process died.

`watch(root, specs)` starts it as a recorded process (`run/watchdog.json`) and hands it the
specs in `run/watchdog.plan` (mode 0600: specs carry secrets in their environment). It polls
the pid files; a service whose process is gone or a zombie is restarted from the same spec,
after an exponential backoff, its dependencies first. After `max_restarts` within `window_s`
it gives up and records the service as failed, with the reason and the log tail. It only
restarts under the root's lock, taken without waiting, so it never races `up` or `down`, and
a service without a pid file (stopped by `down`) is never brought back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from stagegate.errors import PermanentError
from stagegate.supervise import procfs as procs
from stagegate.supervise.spec import HealthCheck, ServiceSpec
from stagegate.supervise.supervisor import (
    _CHILDREN,
    WATCHDOG,
    RestartHistory,
    ServiceRecord,
    ServiceStatus,
    _adopt_or_clean,
    _alive,
    _Dirs,
    _healthy,
    _lock,
    _log_tail,
    _read_records,
    _select,
    _start,
    _status,
    _stop,
    _try_lock,
    _wait_healthy,
    _write_record,
)

# The folder that holds the `stagegate` package, for the watchdog when it is not installed.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]
_OWN_RECORD_GRACE_S = 10.0


class WatchPolicy(BaseModel):
    """How often to look, how long to wait before a restart, when to give up."""

    poll_s: float = Field(default=2.0, gt=0, description="Seconds between looks at pid files.")
    backoff_base_s: float = Field(
        default=1.0, ge=0, description="Wait before the first restart; doubles per restart."
    )
    backoff_cap_s: float = Field(default=60.0, ge=0, description="The longest wait.")
    max_restarts: int = Field(
        default=5, ge=0, description="Restarts allowed within `window_s` before giving up."
    )
    window_s: float = Field(default=300.0, gt=0, description="The crash-loop window.")

    def delay_s(self, recent_restarts: int) -> float:
        return float(min(self.backoff_cap_s, self.backoff_base_s * 2**recent_restarts))


class WatchPlan(BaseModel):
    """What the watchdog process reads each poll: the specs it restarts and its policy."""

    specs: list[ServiceSpec]
    policy: WatchPolicy


# -- starting and reading the watchdog ----------------------------------------------------


def watch(
    root: Path,
    specs: Sequence[ServiceSpec],
    *,
    policy: WatchPolicy | None = None,
    timeout_s: float = 30,
    on_event: Callable[[str], None] | None = None,
) -> ServiceStatus:
    """Start the watchdog of `root` for `specs` (or hand a running one the new plan)."""
    emit = on_event or (lambda _msg: None)
    plan = WatchPlan(specs=_select(list(specs), None), policy=policy or WatchPolicy())
    dirs = _Dirs(root)
    for folder in (dirs.run, dirs.logs):
        folder.mkdir(parents=True, exist_ok=True)
    with _lock(dirs):
        _write_private(dirs.watch_plan, plan.model_dump_json(indent=2))
        spec = _watchdog_spec(dirs)
        record = _adopt_or_clean(dirs, spec, emit)
        if record is None:
            record = _start(dirs, spec, emit)
            try:
                _wait_healthy([record], time.monotonic() + timeout_s, timeout_s, emit)
            except BaseException:
                _stop(dirs, record, timeout_s=5)
                raise
        else:
            emit(f"{WATCHDOG} already running (pid {record.pid}); it reads the new plan")
    return watchdog_status(root)


def watchdog_status(root: Path) -> ServiceStatus:
    dirs = _Dirs(root)
    records = _read_records(dirs) if dirs.run.is_dir() else {}
    return _status(dirs, WATCHDOG, records.get(WATCHDOG), None)


def _watchdog_spec(dirs: _Dirs) -> ServiceSpec:
    python_path = os.pathsep.join(p for p in (str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    return ServiceSpec(
        name=WATCHDOG,
        argv=[sys.executable, "-m", "stagegate.supervise", str(dirs.home)],
        env={"PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1"},
        health_check=HealthCheck(ready_file=dirs.run / "watchdog.ready"),
    )


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


# -- the watchdog process ------------------------------------------------------------------


@dataclass
class _Pending:
    """A dead service waiting for its restart; `key` tells its pid file apart from a newer one."""

    key: tuple[int, int]
    due: float
    reason: str


class Watchdog:
    """One pass (`tick`) restarts what is due; `run` repeats it until stopped."""

    def __init__(self, root: Path, emit: Callable[[str], None] = print) -> None:
        self.dirs = _Dirs(root)
        self.emit = emit
        self.pending: dict[str, _Pending] = {}

    def tick(self, plan: WatchPlan) -> None:
        records = _read_records(self.dirs)
        specs = {s.name: s for s in plan.specs}
        dead = {
            name: r
            for name, r in records.items()
            if name in specs and r.failed is None and not _alive(r)
        }
        for name in list(self.pending):
            record = dead.get(name)
            if record is None or self.pending[name].key != (record.pid, record.start_ticks):
                del self.pending[name]  # revived, stopped, failed, or restarted by `up`
        for name, record in dead.items():
            if name not in self.pending:
                self._schedule(plan.policy, record)
        for spec in plan.specs:  # dependency order: a dead dependency is restarted first
            pending = self.pending.get(spec.name)
            if pending is None or pending.due > time.monotonic():
                continue
            waiting = [d for d in spec.depends_on if not self._ready(records.get(d), dead)]
            failed = [d for d in waiting if (r := records.get(d)) is not None and r.failed]
            if failed:
                self._give_up(dead[spec.name], f"its dependency {failed[0]} failed")
            elif not waiting:
                self._restart(spec, dead[spec.name], pending, plan.policy)

    def run(self, stop: threading.Event) -> None:
        """Poll until `stop` is set, or until this process no longer owns the watchdog record."""
        begun = time.monotonic()
        while not stop.is_set():
            own = _read_records(self.dirs).get(WATCHDOG) if self.dirs.run.is_dir() else None
            if own is not None and own.pid != os.getpid():
                self.emit("another watchdog owns this root; exiting")
                return
            if own is None and time.monotonic() - begun > _OWN_RECORD_GRACE_S:
                self.emit("my pid file is gone (`down`?); exiting")
                return
            try:
                plan = WatchPlan.model_validate_json(self.dirs.watch_plan.read_bytes())
            except FileNotFoundError:
                self.emit("no plan; exiting")
                return
            except (OSError, ValidationError) as exc:
                self.emit(f"unreadable plan ({exc}); trying again")
                stop.wait(1.0)
                continue
            self.tick(plan)
            stop.wait(self._next_wait(plan.policy))

    def _next_wait(self, policy: WatchPolicy) -> float:
        now = time.monotonic()
        sooner = [p.due - now for p in self.pending.values()]
        return max(0.05, min([policy.poll_s, *sooner]))

    def _ready(self, record: ServiceRecord | None, dead: dict[str, ServiceRecord]) -> bool:
        return record is not None and record.name not in dead and _healthy(record)

    def _schedule(self, policy: WatchPolicy, record: ServiceRecord) -> None:
        reason = _death_reason(record)
        recent = _recent(record, policy)
        if len(recent) >= policy.max_restarts:
            self._give_up(
                record,
                f"{reason}; gave up after {len(recent)} restarts within {policy.window_s:g} s",
            )
            return
        delay = policy.delay_s(len(recent))
        self.emit(f"{record.name}: {reason}; restarting in {delay:g} s")
        self.pending[record.name] = _Pending(
            key=(record.pid, record.start_ticks), due=time.monotonic() + delay, reason=reason
        )

    def _restart(
        self, spec: ServiceSpec, record: ServiceRecord, pending: _Pending, policy: WatchPolicy
    ) -> None:
        with _try_lock(self.dirs) as locked:
            if not locked:
                return  # `up` or `down` is at work: look again next poll
            current = _read_records(self.dirs).get(spec.name)
            if current is None or (current.pid, current.start_ticks) != pending.key:
                del self.pending[spec.name]
                return
            now = datetime.now(UTC)
            history = RestartHistory(
                count=record.restarts.count + 1,
                last_at=now,
                last_reason=pending.reason,
                recent=[*_recent(record, policy), now],
            )
            _stop(self.dirs, record, timeout_s=5)  # leftovers of its group, and the pid file
            try:
                new = _start(self.dirs, spec, self.emit, restarts=history)
            except PermanentError as exc:
                _write_record(self.dirs, record.model_copy(update={"failed": str(exc)}))
                self.emit(f"{spec.name}: cannot restart: {exc}")
            else:
                self.emit(f"{spec.name}: restart {history.count} (pid {new.pid})")
            del self.pending[spec.name]

    def _give_up(self, record: ServiceRecord, reason: str) -> None:
        with _try_lock(self.dirs) as locked:
            if not locked:
                return
            current = _read_records(self.dirs).get(record.name)
            if current is None or (current.pid, current.start_ticks) != (
                record.pid,
                record.start_ticks,
            ):
                return
            failed = f"{reason}. Last lines of {record.log}:\n{_log_tail(record)}"
            _write_record(self.dirs, record.model_copy(update={"failed": failed}))
            self.pending.pop(record.name, None)
            self.emit(f"{record.name}: failed: {reason}")


def _recent(record: ServiceRecord, policy: WatchPolicy) -> list[datetime]:
    now = datetime.now(UTC)
    return [t for t in record.restarts.recent if (now - t).total_seconds() < policy.window_s]


def _death_reason(record: ServiceRecord) -> str:
    child = _CHILDREN.get(record.pid)  # services this watchdog restarted are its children
    if child is not None and child.returncode is not None:
        code = child.returncode
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"
    stat = procs.proc_stat(record.pid)
    if stat is not None and stat.zombie and stat.start_ticks == record.start_ticks:
        return "exited (a zombie its parent has not reaped)"
    return "process gone"


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m stagegate.supervise ROOT`: the watchdog process that `watch` starts."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.exit("usage: python -m stagegate.supervise ROOT")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    dog = Watchdog(Path(args[0]), emit=lambda msg: print(f"{datetime.now(UTC):%H:%M:%S} {msg}"))
    (dog.dirs.run / "watchdog.ready").touch()
    dog.emit(f"watching {dog.dirs.home} (pid {os.getpid()})")
    dog.run(stop)
