"""shadow / canary: once a version enters the stage, compare its live answers with the
champion's until the policy can decide, and record the report the next gate needs."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from stagegate import runtime
from stagegate.steps.evaluate import evaluate
from stagegate.steps.retry import RETRYING

POLL_S = 5.0


@task(**RETRYING)
def evaluate_once(model: str, version: int) -> dict[str, Any]:
    rt = runtime.current()
    return asdict(evaluate(rt.engine, rt.sink, rt.settings.inference_log_url, model, version))


@flow(name="evaluate-stage", log_prints=True)
def evaluate_stage(model: str, version: int) -> dict[str, Any]:
    """Poll every few seconds; ends when the report is decided or the version left the stage
    (the policy's `max_wait_s` turns a quiet stage into a failed report)."""
    log = get_run_logger()
    while True:
        result = evaluate_once(model, version)
        if result["kind"] is None or result["decided"]:
            log.info(
                "%s v%s: %s report %s: %s",
                model,
                version,
                result["kind"],
                "passed" if result["passed"] else "failed",
                result["reason"],
            )
            return result
        log.info("%s v%s: %s", model, version, result["reason"])
        time.sleep(POLL_S)
