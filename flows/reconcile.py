"""reconcile: on a schedule, catch versions and transitions that events missed."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger

from stagegate import runtime
from stagegate.steps.reconcile import reconcile as reconcile_step


@flow(name="reconcile", log_prints=True)
def reconcile() -> dict[str, Any]:
    rt = runtime.current()
    report = reconcile_step(
        rt.engine,
        rt.registry,
        rt.sink,
        stale_after_s=rt.settings.lifecycle.stale_transition_s,
        sync_endpoint=lambda model: runtime.sync_endpoint(rt, model),
    )
    get_run_logger().info("reconcile: %s", asdict(report))
    return asdict(report)
