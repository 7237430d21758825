"""What every step shares."""

from __future__ import annotations

from collections.abc import Iterable

from stagegate.db import Engine, transaction, utcnow
from stagegate.events.announce import announce_if_approved
from stagegate.events.sink import EventSink
from stagegate.governance import transitions
from stagegate.governance.models import TransitionStatus
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import Role

# The identity steps act under: it requests transitions and appears in the audit log.
SERVICE = Principal("stagegate", Role.service)


def regate(engine: Engine, sink: EventSink, transition_ids: Iterable[str]) -> list[str]:
    """Re-run the gates of pending transitions, one transaction each; announce approvals.

    Returns the ids that became approved (announced or, if the emit failed, left to
    reconcile's stale-approval pass)."""
    approved = []
    for tid in transition_ids:
        with transaction(engine) as session:
            t = transitions.reevaluate(session, transition_id=tid, now=utcnow(), actor=SERVICE.name)
        if t.status is TransitionStatus.approved:
            approved.append(tid)
            announce_if_approved(sink, t)
    return approved
