"""Registry webhook deliveries, each accepted once (MLflow may redeliver; attackers may replay)."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from stagegate.errors import ConflictError
from stagegate.governance import audit
from stagegate.governance.models import WebhookDelivery


def accept_once(
    session: Session, *, delivery_id: str, entity: str, action: str, summary: dict[str, object]
) -> None:
    """Record the delivery in the caller's transaction; a repeat raises ConflictError."""
    if session.get(WebhookDelivery, delivery_id) is not None:
        raise ConflictError(f"delivery {delivery_id} was already processed")
    try:
        with session.begin_nested():
            session.add(WebhookDelivery(delivery_id=delivery_id, entity=entity, action=action))
    except IntegrityError as exc:  # a concurrent duplicate won the race
        raise ConflictError(f"delivery {delivery_id} was already processed") from exc
    audit.append(
        session,
        actor="mlflow-webhook",
        action="webhook.received",
        entity_type="delivery",
        entity_id=delivery_id,
        data={"event": f"{entity}.{action}", **summary},
    )
