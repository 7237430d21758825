"""The `KubeClient` protocol: the five API calls the backend makes, and their errors.

Everything above it (what to apply, when, how to wait, what to remove) is tested against an
in-memory API (`tests/kube_fake.py`); `live.py` maps it onto the official client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Ref:
    """One object: its type and where it lives."""

    api_version: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, manifest: Manifest) -> Ref:
        meta = manifest["metadata"]
        return cls(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name} in {self.namespace}"


class KubeError(Exception):
    """An API answer other than success. `status` is the HTTP status: 404 missing, 409 a stale
    resourceVersion (or a field conflict), 422 an invalid object, 403 not allowed, 5xx the
    server; 0 when no answer came at all."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class KubeClient(Protocol):
    def get(self, ref: Ref) -> Manifest | None:
        """The object as stored, or None when it does not exist."""
        ...

    def apply(self, manifest: Manifest, *, field_manager: str) -> Manifest:
        """Server-side apply, forcing ownership of the fields it sets. With
        `metadata.resourceVersion` set it is a conditional write: 409 if the object changed
        since that version. Returns the stored object."""
        ...

    def delete(self, ref: Ref, *, resource_version: str | None = None) -> bool:
        """Delete (pods in the background); False when it did not exist. With
        `resource_version`, 409 if the object changed since."""
        ...

    def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str
    ) -> list[Manifest]:
        """Objects of one kind in the namespace that match an equality label selector."""
        ...
