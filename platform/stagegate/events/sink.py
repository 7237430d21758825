"""Where Stagegate's events go: Prefect's event API in production, a list in tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import uuid4

import httpx

from stagegate.db import utcnow
from stagegate.errors import RetryableError


@dataclass(frozen=True)
class OutEvent:
    """A Prefect event: `event` names it, `resource` must hold `prefect.resource.id`."""

    event: str
    resource: dict[str, str]
    payload: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: str(uuid4()))
    occurred: datetime = field(default_factory=utcnow)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "occurred": self.occurred.isoformat(),
            "event": self.event,
            "resource": self.resource,
            "payload": self.payload,
            "related": [],
        }


class EventSink(Protocol):
    def emit(self, event: OutEvent) -> None:
        """Deliver the event or raise RetryableError; never drop it silently."""
        ...


def model_resource(name: str, version: int | None = None, **labels: str) -> dict[str, str]:
    rid = f"stagegate.model.{name}" + (f".{version}" if version is not None else "")
    resource = {"prefect.resource.id": rid, "stagegate.model.name": name, **labels}
    if version is not None:
        resource["stagegate.model.version"] = str(version)
    return resource


class PrefectEventSink:
    """POSTs events to the Prefect server's `/events` endpoint and waits for its 204.

    `prefect.events.emit_event` hands events to a background websocket and cannot say
    whether they arrived; a webhook must know, so that a failure becomes a 503 that MLflow
    retries instead of a silently lost version.
    """

    def __init__(self, api_url: str, timeout_s: float = 5.0) -> None:
        self._client = httpx.Client(base_url=api_url.rstrip("/"), timeout=timeout_s)

    def emit(self, event: OutEvent) -> None:
        try:
            response = self._client.post("/events", json=[event.as_json()])
        except httpx.HTTPError as exc:
            raise RetryableError(f"Prefect unreachable: {exc}") from exc
        if response.status_code >= 300:
            raise RetryableError(
                f"Prefect refused the event: {response.status_code} {response.text[:200]}"
            )

    def close(self) -> None:
        self._client.close()


@dataclass
class MemorySink:
    """Keeps events in a list: for tests of the API alone, and for dry runs."""

    events: list[OutEvent] = field(default_factory=list)

    def emit(self, event: OutEvent) -> None:
        self.events.append(event)
