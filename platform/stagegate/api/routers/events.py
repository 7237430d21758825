"""The MLflow webhook receiver: verify, accept each delivery once, emit a Prefect event."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, status

from stagegate.api import schemas, strict
from stagegate.api.deps import SessionDep, StateDep
from stagegate.api.errors import responses
from stagegate.api.limits import MAX_INT
from stagegate.errors import InvalidInput
from stagegate.events.signature import DeliveryHeaders, InvalidDelivery, parse_headers, verify
from stagegate.events.sink import OutEvent, model_resource
from stagegate.governance.deliveries import accept_once
from stagegate.registry.protocol import valid_model_name

router = APIRouter(prefix="/api/v1/events", tags=["events"], route_class=strict.StrictRoute)

MAX_BODY = 256 * 1024
MAX_TIMESTAMP = 2**53  # unix seconds: any real one is far below, and a float holds it exactly

# The route reads the raw body (the signature covers its bytes), so FastAPI cannot see what it
# expects: declared here for clients and the fuzzer. Unsigned requests never get past 401.
_DELIVERY_SPEC: dict[str, Any] = {
    "parameters": [
        {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
        for name in ("x-mlflow-delivery-id", "x-mlflow-timestamp", "x-mlflow-signature")
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["entity", "action", "data"],
                    "properties": {
                        "entity": {"type": "string", "description": "e.g. `model_version`"},
                        "action": {"type": "string", "description": "e.g. `created`"},
                        "data": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "version": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
                            },
                        },
                    },
                }
            }
        },
    },
}


async def signed_delivery(request: Request, state: StateDep) -> tuple[DeliveryHeaders, bytes]:
    """The webhook's authorization: an HMAC signature instead of a bearer token."""
    body = await request.body()
    if len(body) > MAX_BODY:
        raise InvalidInput(f"body over {MAX_BODY} bytes")
    headers = parse_headers({k.lower(): v for k, v in request.headers.items()})
    if not 0 <= headers.timestamp <= MAX_TIMESTAMP:  # beyond a float, the skew check overflows
        raise InvalidDelivery("x-mlflow-timestamp is out of range")
    verify(
        state.settings.webhook.secret,
        headers,
        body,
        now=time.time(),
        max_skew_s=state.settings.webhook.max_skew_s,
    )
    return headers, body


signed_delivery.__stagegate_authz__ = True  # type: ignore[attr-defined]


def _parse(body: bytes) -> tuple[str, str, dict[str, Any]]:
    try:
        doc = strict.loads(body)
    except ValueError:
        raise InvalidInput("body is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput("body must be a JSON object")
    entity, action, data = doc.get("entity"), doc.get("action"), doc.get("data")
    if not isinstance(entity, str) or not isinstance(action, str) or not isinstance(data, dict):
        raise InvalidInput("body needs string `entity`, `action` and object `data`")
    if not (entity.replace("_", "").isalnum() and action.replace("_", "").isalnum()):
        raise InvalidInput("`entity` and `action` must be identifiers")
    return entity, action, data


@router.post(
    "/mlflow",
    status_code=status.HTTP_202_ACCEPTED,
    responses=responses(401, 409, 413, 422, 503),
    openapi_extra=_DELIVERY_SPEC,
)
def mlflow_webhook(
    session: SessionDep,
    state: StateDep,
    delivery: Annotated[tuple[DeliveryHeaders, bytes], Depends(signed_delivery)],
) -> schemas.WebhookAccepted:
    """Turn a verified registry delivery into the Prefect event `mlflow.<entity>.<action>`.

    Only names and version numbers travel on; flows re-read everything else from the
    registry, so nothing in the body (a `source` URI, say) is ever fetched.
    """
    headers, body = delivery
    entity, action, data = _parse(body)
    name = data.get("name")
    raw_version = data.get("version")
    if not isinstance(name, str) or not valid_model_name(name):
        raise InvalidInput("`data.name` must be a model name (letters, digits, `_.-`)")
    version: int | None = None
    if raw_version is not None:
        try:
            version = int(raw_version)
        except (TypeError, ValueError, OverflowError):  # OverflowError: 1e999 parses as inf
            raise InvalidInput("`data.version` must be an integer") from None
        if not 1 <= version <= MAX_INT:
            raise InvalidInput(f"`data.version` must lie in 1..{MAX_INT}")
    event_name = f"mlflow.{entity}.{action}"
    accept_once(
        session,
        delivery_id=headers.delivery_id,
        entity=entity,
        action=action,
        summary={"model": name, "version": version},
    )
    # Emit before commit: if Prefect is down we answer 503, record nothing, and MLflow retries.
    state.sink.emit(
        OutEvent(
            event=event_name,
            resource=model_resource(name, version, **{"mlflow.delivery_id": headers.delivery_id}),
            # Typed copies for trigger templates: resource labels are strings, and Prefect
            # validates run parameters against the flow's schema (`version: int`).
            payload={
                "entity": entity,
                "action": action,
                "delivery_id": headers.delivery_id,
                "name": name,
                "version": version,
            },
        )
    )
    session.commit()
    return schemas.WebhookAccepted(delivery_id=headers.delivery_id, event=event_name, emitted=True)
