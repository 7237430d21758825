"""Warm flow runs: one multiprocessing forkserver that imports the flows' modules once.

Prefect runs each flow run of an in-memory flow in a fresh `spawn` interpreter, which imports
prefect, mlflow and Stagegate again: about 5 s of the 6.5-7.5 s from created to Running. A
*forkserver* is a small process that the worker starts once. It imports the modules named
here (`preload`) and then only forks: each run is a child forked from it, with those modules
already in memory.

Why this is safe:
- The forkserver is single-threaded when it forks (it only imports and then waits on a
  socket; `probe` checks its thread count), so no lock held by another thread is copied into
  a child. The worker itself, which runs an event loop and threads, never forks. Two native
  libraries start threads on import: numpy's OpenBLAS pool, which shuts itself down before
  every fork (its own `pthread_atfork` handler), and the background purge thread of
  pyarrow's bundled jemalloc, which `QUIET_THREADS` turns off (pyarrow's default pool is
  mimalloc, so jemalloc holds nothing anyway). Runs inherit that setting.
- A run is still its own process: a child that crashes, calls `os._exit` or is SIGKILLed
  ends alone. The forkserver reaps it and reports its exit code, and Prefect's runner marks
  the run Crashed. If the forkserver itself dies, multiprocessing starts a new one on the
  next run (paying the imports once more).
- Each child gets its environment and settings from Prefect's own payload (the same as with
  `spawn`), not from the forkserver's environment. Nothing is *executed* in the forkserver
  beyond imports: no engine, client or runtime exists there to be shared after the fork.

This module does not import prefect; `worker.py` plugs the context into Prefect.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import PurePosixPath

from stagegate.errors import PermanentError

log = logging.getLogger(__name__)

MODE_ENV = "STAGEGATE_WORKER_START"
FORKSERVER = "forkserver"
SPAWN = "spawn"  # Prefect's own cold start: the benchmark's baseline
# Imported on first use inside every run (Prefect's engine for tasks, the asyncio backend,
# the flow-call visualisation hook), or by intake and promote (`Runtime.registry`: mlflow).
LAZY_IMPORTS = (
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.utilities.visualization",
    "anyio._backends._asyncio",
    "stagegate.registry.mlflow",
)
WARMUP_TIMEOUT_S = 120.0
QUIET_THREADS = {"JE_ARROW_MALLOC_CONF": "background_thread:false"}


def start_mode() -> str:
    """`$STAGEGATE_WORKER_START`: `forkserver` (the default) or `spawn`."""
    mode = os.environ.get(MODE_ENV, FORKSERVER)
    if mode not in (FORKSERVER, SPAWN):
        raise PermanentError(f"{MODE_ENV} must be {FORKSERVER} or {SPAWN}, not {mode!r}")
    return mode


def entrypoint_module(entrypoint: str) -> str | None:
    """`flows/intake.py:intake` -> `flows.intake`; None for what is not a relative .py path."""
    path = PurePosixPath(entrypoint.rsplit(":", 1)[0])
    if path.suffix != ".py" or path.is_absolute() or ".." in path.parts:
        return None
    return ".".join(path.with_suffix("").parts)


def preload(entrypoints: Sequence[str]) -> list[str]:
    """What the forkserver imports: the flows' modules and what they import on first use."""
    flows = [m for m in map(entrypoint_module, entrypoints) if m is not None]
    return list(dict.fromkeys([*LAZY_IMPORTS, *flows]))


def start_forkserver(modules: Sequence[str]) -> multiprocessing.context.ForkServerContext:
    """Start the forkserver, wait until it has imported `modules`, and check it.

    `__main__` (the `stagegate` script) is preloaded too, so children do not run it again.
    The forkserver skips modules that fail to import; the probe child says which, and the
    worker logs them rather than refusing to start (those runs then import them themselves).
    """
    for key, value in QUIET_THREADS.items():
        os.environ.setdefault(key, value)  # the forkserver copies this environment
    ctx = multiprocessing.get_context(FORKSERVER)
    assert isinstance(ctx, multiprocessing.context.ForkServerContext)
    ctx.set_forkserver_preload(["__main__", *modules])
    started = time.monotonic()
    child = ctx.Process(target=probe, args=(list(modules),), name="stagegate-warmup", daemon=True)
    child.start()
    child.join(WARMUP_TIMEOUT_S)
    if child.exitcode != 0:
        log.warning("forkserver probe exited with %s; runs may import more", child.exitcode)
    log.info("forkserver ready in %.1f s, preloaded %s", time.monotonic() - started, modules)
    return ctx


def probe(modules: list[str]) -> None:
    """Runs in a child of the forkserver: exit 3 if a module is missing, 4 if it had threads."""
    missing = [m for m in modules if m not in sys.modules]
    if missing:
        print(f"forkserver did not preload {missing}", file=sys.stderr, flush=True)
        sys.exit(3)
    parent_threads = _threads_of(os.getppid())
    if parent_threads is not None and parent_threads != 1:
        print(f"forkserver has {parent_threads} threads", file=sys.stderr, flush=True)
        sys.exit(4)
    if threading.active_count() != 1:
        sys.exit(4)


def _threads_of(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None
