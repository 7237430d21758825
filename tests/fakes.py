"""Fakes at our own protocol boundaries: `ModelRegistry` and `ServingBackend`.

Tests of the registry adapter itself, and the end-to-end tests, use a real MLflow server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from stagegate.errors import NoReference, NotFoundError, PermanentError
from stagegate.lifecycle.stages import REGISTRY_ALIAS, Stage
from stagegate.registry import reference
from stagegate.registry.protocol import DatasetRef, RegistryVersion, VersionRef
from stagegate.serving.backends.protocol import DeploymentState, ServedVersion


@dataclass
class FakeRegistry:
    versions: dict[tuple[str, int], RegistryVersion] = field(default_factory=dict)
    digests: dict[tuple[str, int], str] = field(default_factory=dict)
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)
    stage_tags: dict[tuple[str, int], str] = field(default_factory=dict)
    mirror_calls: int = 0
    # What `log_reference` would have logged in the version's run (the artifact convention).
    references: dict[tuple[str, int], pa.Table] = field(default_factory=dict)
    # A version's model: a function from rows to one answer per row (`predict`).
    models: dict[tuple[str, int], Callable[[pa.Table], list[Any]]] = field(default_factory=dict)

    def add(
        self,
        name: str,
        version: int,
        *,
        creator: str = "dana",
        accuracy: float = 0.9,
        datasets: tuple[DatasetRef, ...] | None = None,
    ) -> None:
        if datasets is None:
            datasets = (DatasetRef("train", f"d{version}", "file:///train.csv", "training"),)
        self.versions[(name, version)] = RegistryVersion(
            name=name,
            version=version,
            source=f"models:/{name}/{version}",
            run_id=f"run{version}",
            creator=creator,
            created_at=datetime.now(UTC),
            metrics={"accuracy": accuracy},
            datasets=datasets,
        )
        self.digests[(name, version)] = f"{version:064x}"

    def get_version(self, name: str, version: int) -> RegistryVersion:
        try:
            return self.versions[(name, version)]
        except KeyError:
            raise NotFoundError(f"no {name}/{version}") from None

    def list_versions(self) -> list[VersionRef]:
        return [VersionRef(n, v) for n, v in sorted(self.versions)]

    def artifact_digest(self, name: str, version: int) -> str:
        self.get_version(name, version)
        return self.digests[(name, version)]

    def mirror_stage(self, name: str, version: int, stage: Stage) -> None:
        self.mirror_calls += 1
        self.stage_tags[(name, version)] = stage.value
        model_aliases = self.aliases.setdefault(name, {})
        for s, alias in REGISTRY_ALIAS.items():
            if s is stage:
                model_aliases[alias] = version
            elif model_aliases.get(alias) == version:
                del model_aliases[alias]

    def ensure_webhook(self, url: str, secret: str, events: list[str]) -> str:
        return "fake-webhook"

    def load_reference(self, name: str, version: int) -> pa.Table:
        """As `MlflowRegistry`: the logged reference, else the datasets' sources, read for real
        by the same code (`registry/reference.py`)."""
        got = self.get_version(name, version)
        what = f"model version {name}/{version}"
        if got.run_id is None:
            raise NoReference(f"{what} has no training run to take reference data from")
        if (name, version) in self.references:
            return self.references[(name, version)]
        return reference.read_datasets(got.datasets, what=f"reference of {what}")

    def describe_reference(self, name: str, version: int) -> str | None:
        got = self.get_version(name, version)
        if got.run_id is None:
            return None
        if (name, version) in self.references:
            return f"runs:/{got.run_id}/{reference.REFERENCE_ARTIFACT_PATH}"
        return reference.describe_datasets(got.datasets)

    def predict(self, name: str, version: int, rows: pa.Table, *, digest: str | None) -> list[Any]:
        self.get_version(name, version)
        if digest is not None and self.digests[(name, version)] != digest:
            raise PermanentError(f"models:/{name}/{version} changed since it was recorded")
        return self.models[(name, version)](rows)

    def swap_artifact(self, name: str, version: int) -> None:
        self.digests[(name, version)] = "f" * 64
        self.versions[(name, version)] = replace(self.versions[(name, version)])


@dataclass
class FakeBackend:
    """A serving backend that starts nothing: a fake at our own `ServingBackend` boundary.

    The local backend is tested with real model server processes in test_local_backend.py.
    `restart` moves a server to a new port, as a crashed local server would come back.
    """

    name: str = "fake"
    servers: dict[tuple[str, int], DeploymentState] = field(default_factory=dict)
    deploy_calls: list[ServedVersion] = field(default_factory=list)
    next_port: int = 7001
    on_deploy: Callable[[ServedVersion], None] | None = None

    def _url(self) -> str:
        self.next_port += 1
        return f"http://127.0.0.1:{self.next_port - 1}"

    def deploy(self, served: ServedVersion, *, timeout_s: float = 120) -> DeploymentState:
        self.deploy_calls.append(served)
        if self.on_deploy is not None:
            self.on_deploy(served)
        key = (served.model, served.version)
        if key not in self.servers:
            self.servers[key] = DeploymentState(
                served.key, served.model, served.version, self._url(), running=True, healthy=True
            )
        return self.servers[key]

    def restart(self, model: str, version: int) -> None:
        self.servers[(model, version)] = replace(self.servers[(model, version)], url=self._url())

    def observe(self, model: str, version: int) -> DeploymentState | None:
        return self.servers.get((model, version))

    def remove(self, model: str, version: int) -> bool:
        return self.servers.pop((model, version), None) is not None

    def list(self) -> list[DeploymentState]:
        return list(self.servers.values())
