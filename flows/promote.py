"""promote: triggered by `stagegate.transition.approved`; applies the transition.

It moves the stage (retiring a displaced champion), records the deployment windows and
mirrors aliases into the registry. Keyed by the transition id, so a rerun is harmless.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from stagegate import runtime
from stagegate.events.announce import announce_applied
from stagegate.steps.apply import apply_transition
from stagegate.steps.retry import RETRYING


@task(**RETRYING)
def apply(transition_id: str) -> dict[str, Any]:
    rt = runtime.current()
    return asdict(apply_transition(rt.engine, rt.registry, transition_id, backend=rt.backend.name))


@task(**RETRYING)
def sync_endpoint(model: str) -> dict[str, Any]:
    return asdict(runtime.sync_endpoint(runtime.current(), model))


@flow(name="promote", log_prints=True)
def promote(transition_id: str) -> dict[str, Any]:
    result = apply(transition_id)
    get_run_logger().info(
        "transition %s: %s (%s); mirrored %s",
        transition_id,
        result["status"],
        result["reason"],
        result["mirrored"],
    )
    if result["status"] == "applied":
        # Serve what the database now says: deploy, route, then stop what lost its role.
        endpoint = sync_endpoint(result["model"])
        get_run_logger().info(
            "endpoint %s: serving %s, stopped %s",
            result["model"],
            endpoint["served"],
            endpoint["removed"],
        )
        result["endpoint"] = endpoint
        announce_applied(
            runtime.current().sink,
            transition_id=transition_id,
            model=result["model"],
            version=result["version"],
            from_stage=result["from_stage"],
            to_stage=result["to_stage"],
        )
    return result
