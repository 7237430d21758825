"""A server process for a benchmark: started in its own process group, awaited until its
`/health` answers, and stopped with its whole group (`make bench` skips `_*.py` files)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def running(
    argv: list[str],
    url: str,
    log: Path,
    *,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 120,
    stop_timeout_s: float = 15,
) -> Iterator[float]:
    """Yield the seconds the server took to answer `/health` with 200."""
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        while True:
            with (
                contextlib.suppress(urllib.error.URLError, OSError),
                urllib.request.urlopen(url + "/health", timeout=2) as resp,  # noqa: S310 - our http URL
            ):
                if resp.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() - started > start_timeout_s:
                raise SystemExit(f"{argv[:3]} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
