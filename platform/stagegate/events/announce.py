"""Announcements the platform makes as Prefect events once a change has committed."""

from __future__ import annotations

import logging

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
