"""The inference record, and the writer protocol the router logs through."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from stagegate.lifecycle.stages import DeploymentRole as Role

__all__ = ["InferenceLogWriter", "InferenceRecord", "Role"]


@dataclass(frozen=True)
class InferenceRecord:
    """One answered request of one arm. Shadow answers are logged too, never returned."""

    request_id: str
    model: str
    version: int
    role: Role
    key_hash: str | None  # sha256 hex of the assignment key, never the key itself
    inputs: Any  # the request body's inputs, as received (JSON-compatible); None if not JSON
    output: Any  # the predictions (JSON-compatible); None when the arm failed
    status: int  # HTTP status the arm answered (or 599 for a transport error/timeout)
    latency_ms: float
    at: datetime  # aware UTC
    # The raw request body and its Content-Type header, for the writer to decode into feature
    # rows (`features.py`) off the request path. Not stored in the record itself, and not
    # compared: a record read back has neither.
    body: bytes | None = field(default=None, repr=False, compare=False)
    content_type: str | None = field(default=None, compare=False)


class InferenceLogWriter(Protocol):
    def append(self, record: InferenceRecord) -> None:
        """Buffer the record; never block on I/O. Flushed in batches, and on close()."""
        ...

    def close(self) -> None:
        """Flush everything buffered and stop. Idempotent."""
        ...
