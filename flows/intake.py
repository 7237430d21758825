"""intake: triggered by `mlflow.model_version.created`; records the version, opens ->shadow."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from stagegate import runtime
from stagegate.steps.intake import intake as intake_step
from stagegate.steps.offpolicy import evaluate_candidate
from stagegate.steps.retry import RETRYING


@task(**RETRYING)
def record_and_open(name: str, version: int) -> dict[str, Any]:
    rt = runtime.current()
    return asdict(intake_step(rt.engine, rt.registry, rt.sink, name, version))


@task(**RETRYING)
def offpolicy_report(name: str, version: int) -> dict[str, Any]:
    """The offline counterfactual gate, where the policy has one (a no-op otherwise)."""
    rt = runtime.current()
    return asdict(
        evaluate_candidate(
            rt.engine, rt.registry, rt.sink, rt.settings.inference_log_url, name, version
        )
    )


@flow(name="intake", log_prints=True)
def intake(name: str, version: int) -> dict[str, Any]:
    result = record_and_open(name, version)
    offline = offpolicy_report(name, version)
    if offline["decided"]:
        get_run_logger().info("%s v%s off-policy gate: %s", name, version, offline["reason"])
    get_run_logger().info(
        "%s v%s recorded=%s transition=%s digest=%s",
        name,
        version,
        result["recorded"],
        result["transition_id"],
        result["digest"][:12],
    )
    return result
