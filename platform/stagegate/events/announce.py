"""Announcements the platform makes as Prefect events once a change has committed."""

from __future__ import annotations

import logging
from uuid import NAMESPACE_URL, uuid5

from stagegate.errors import RetryableError
from stagegate.events.sink import EventSink, OutEvent, model_resource
from stagegate.governance.models import Transition, TransitionStatus

log = logging.getLogger(__name__)


def announce_if_approved(sink: EventSink, t: Transition) -> bool:
    """Emit `stagegate.transition.approved` after commit; reconcile covers a lost emit."""
    if t.status is not TransitionStatus.approved:
        return False
    event = OutEvent(
        event="stagegate.transition.approved",
        resource=model_resource(
            t.model_name,
            t.version,
            **{"stagegate.transition.id": t.id, "stagegate.transition.to_stage": t.to_stage.value},
        ),
        payload={
            "transition_id": t.id,
            "from_stage": t.from_stage.value,
            "to_stage": t.to_stage.value,
        },
    )
    try:
        sink.emit(event)
    except RetryableError as exc:
        log.warning("could not announce transition %s (reconcile applies it): %s", t.id, exc.detail)
        return False
    return True


def announce_applied(
    sink: EventSink, *, transition_id: str, model: str, version: int, from_stage: str, to_stage: str
) -> bool:
    """Emit `stagegate.transition.applied` once the stage moved and the endpoint serves it.

    The shadow and canary flows start on it. Converge sends it and marks it sent; a lost emit
    is sent again by the next converge. Two converges racing may both send it: the event id
    is derived from the transition, and Prefect's triggers skip an id seen in the last 30 min.
    """
    event = OutEvent(
        id=str(uuid5(NAMESPACE_URL, f"stagegate:transition.applied:{transition_id}")),
        event="stagegate.transition.applied",
        resource=model_resource(
            model,
            version,
            **{"stagegate.transition.id": transition_id, "stagegate.transition.to_stage": to_stage},
        ),
        payload={
            "transition_id": transition_id,
            "model": model,
            "version": version,
            "from_stage": from_stage,
            "to_stage": to_stage,
        },
    )
    try:
        sink.emit(event)
    except RetryableError as exc:
        log.warning("could not announce applied transition %s: %s", transition_id, exc.detail)
        return False
    return True
