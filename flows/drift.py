"""drift-check: on a schedule, check every watched live version's latest window for drift,
and act on it as each model's policy says (see docs/monitoring.md)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from stagegate import runtime
from stagegate.steps.drift import check_version, targets
from stagegate.steps.retry import RETRYING


@task(**RETRYING)
def check_one(model: str, version: int) -> dict[str, Any]:
    outcome = check_version(runtime.monitor(runtime.current()), model, version)
    return asdict(outcome)


@flow(name="drift-check", log_prints=True)
def drift_check() -> list[dict[str, Any]]:
    """One check per watched version. A version that fails its check (after retries) does
    not stop the others; the run fails at the end so the failure is seen."""
    log = get_run_logger()
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for model, version in targets(runtime.current().engine):
        state = check_one(model, version, return_state=True)
        if state.is_failed():
            failed.append(f"{model} v{version}")
            continue
        result = state.result()
        results.append(result)
        log.info(
            "%s v%s: %s%s",
            model,
            version,
            result["reason"],
            f" (actions: {result['actions']})" if result["actions"] else "",
        )
    if failed:
        raise RuntimeError(f"drift check failed for {', '.join(failed)}")
    return results
