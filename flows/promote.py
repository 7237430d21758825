"""promote: triggered by `stagegate.transition.approved`; applies the transition.

It moves the stage (retiring a displaced champion), records the deployment windows and the
endpoint's desired state in one transaction, mirrors aliases into the registry, then
converges the endpoint, which announces `stagegate.transition.applied` once the router
serves it. Keyed by the transition id, so a rerun is harmless.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, task

from stagegate import runtime
from stagegate.steps.apply import apply_transition
from stagegate.steps.converge import converge
from stagegate.steps.retry import RETRYING


@task(**RETRYING)
def apply(transition_id: str) -> dict[str, Any]:
    rt = runtime.current()
    return asdict(
        apply_transition(rt.engine, rt.registry, transition_id, backend=rt.plane.backend.name)
    )


@task(**RETRYING)
def converge_endpoint(model: str) -> dict[str, Any]:
    rt = runtime.current()
    return asdict(converge(rt.engine, rt.sink, rt.plane, model))


@flow(name="promote", log_prints=True)
def promote(transition_id: str) -> dict[str, Any]:
    log = get_run_logger()
    result = apply(transition_id)
    log.info(
        "transition %s: %s (%s); mirrored %s",
        transition_id,
        result["status"],
        result["reason"],
        result["mirrored"],
    )
    if result["status"] == "applied":
        # Serve what the database now says: deploy, route, stop what lost its role, announce.
        endpoint = converge_endpoint(result["model"])
        log.info(
            "endpoint %s generation %s: serving %s, stopped %s, announced %s",
            result["model"],
            endpoint["generation"],
            endpoint["served"],
            endpoint["removed"],
            endpoint["announced"],
        )
        result["endpoint"] = endpoint
    return result
