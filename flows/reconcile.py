"""reconcile: on a schedule, catch versions, transitions and endpoints that events missed."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from stagegate import runtime


@flow(name="reconcile", log_prints=True)
def reconcile() -> dict[str, Any]:
    report = runtime.reconcile(runtime.current())
    get_run_logger().info("reconcile: %s", asdict(report))
    return asdict(report)
