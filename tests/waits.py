"""Predicate waits for tests against live processes: poll, never sleep-then-assert."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from stagegate.supervise.procfs import proc_stat


def wait_for(
    what: str, probe: Callable[[], Any], timeout_s: float = 60, interval_s: float = 0.2
) -> Any:
    """The first truthy answer of `probe` within `timeout_s`; fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(interval_s)
    raise AssertionError(f"timed out waiting for {what}")


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: only its parent can reap it)."""
    stat_ = proc_stat(pid)
    return stat_ is None or stat_.zombie
