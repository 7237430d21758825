"""What Stagegate needs from a model registry. `mlflow.py` implements it; tests may fake it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from stagegate.lifecycle.stages import Stage

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]

STAGE_TAG = "stagegate.stage"
DEPENDS_ON_TAG = "stagegate.depends_on"

# MLflow allows more, but names reach URLs, file paths and Prefect resource ids: keep them tame.
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def valid_model_name(name: str) -> bool:
    return bool(MODEL_NAME_RE.fullmatch(name)) and ".." not in name


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a training run consumed (MLflow `log_input`). `source` is MLflow's source
    JSON (`{"uri": ...}` for files and object stores, `{"url": ...}` for http) or a plain
    location; `source_type` is MLflow's kind of source (`local`, `http`, `s3`, `code`, ...)."""

    name: str
    digest: str
    source: str
    context: str | None = None
    source_type: str | None = None


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: int


@dataclass(frozen=True)
class RegistryVersion:
    """A model version as the registry knows it, joined with its training run."""

    name: str
    version: int
    source: str
    run_id: str | None
    creator: str | None
    created_at: datetime
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    datasets: tuple[DatasetRef, ...] = ()
    code_commit: str | None = None
    depends_on: tuple[VersionRef, ...] = ()


class ModelRegistry(Protocol):
    def get_version(self, name: str, version: int) -> RegistryVersion:
        """The version with its run's metrics, params and datasets. NotFoundError if absent."""
        ...

    def list_versions(self) -> list[VersionRef]:
        """Every version of every registered model (the reconciler's view)."""
        ...

    def artifact_digest(self, name: str, version: int) -> str:
        """sha256 over the version's model files, in a stable order."""
        ...

    def mirror_stage(self, name: str, version: int, stage: Stage) -> None:
        """Set the `stagegate.stage` tag and the stage's alias; drop aliases it no longer holds."""
        ...

    def ensure_webhook(self, url: str, secret: str, events: list[str]) -> str:
        """Create or update Stagegate's registry webhook; return its id. Idempotent."""
        ...

    def load_reference(self, name: str, version: int) -> pa.Table:
        """The version's reference data (docs/monitoring.md, "Reference data"): the Parquet
        under `stagegate/reference/` in its training run, else its training dataset's source.
        NoReference with the reason when there is none that can be read; NotFoundError if the
        version is absent."""
        ...

    def describe_reference(self, name: str, version: int) -> str | None:
        """Where `load_reference` would read from (an artifact URI, a path or a URL), without
        reading it; None if nowhere."""
        ...

    def predict(self, name: str, version: int, rows: pa.Table, *, digest: str | None) -> list[Any]:
        """The version's answers to `rows`, one per row, scored in one batch by its pyfunc
        model. With `digest`, the downloaded artifact must hash to it (PermanentError if not),
        as the model server checks before it serves."""
        ...
