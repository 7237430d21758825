"""The MLflow adapter behind `ModelRegistry`. The only module in Stagegate that imports mlflow.

Everything here re-reads the registry: webhook payloads are hints, never facts. MLflow errors
are mapped onto Stagegate's error tree (`_mlflow_errors`):

- RESOURCE_DOES_NOT_EXIST / NOT_FOUND → NotFoundError
- INVALID_PARAMETER_VALUE / BAD_REQUEST → InvalidInput
- ALREADY_EXISTS / RESOURCE_ALREADY_EXISTS / RESOURCE_CONFLICT / ABORTED → ConflictError
- any 5xx or 429 code, and connection failures (the client reports those as INTERNAL_ERROR)
  → RetryableError
- the rest (401/403, 404 from something that is not MLflow, ...) → PermanentError

Connection failures and timeouts only surface after MLflow's own HTTP retries, which only the
process-wide `MLFLOW_HTTP_REQUEST_TIMEOUT` / `_MAX_RETRIES` / `_BACKOFF_FACTOR` variables
configure (read at every request). MLflow's defaults (120 s a try, 7 retries with backoff up to
120 s) let one call to a hung server take about 20 minutes; `MlflowRegistry` sets
`HTTP_BOUNDS` where the environment leaves them unset (`bound_http`), so a call fails with a
RetryableError within `call_bound_s()`, and flows retry on their own schedule.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, cast
from urllib.parse import urlparse

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from mlflow import MlflowClient
from mlflow.exceptions import ERROR_CODE_TO_HTTP_STATUS, MlflowException

from stagegate.artifacts import tree_digest
from stagegate.errors import (
    ConflictError,
    InvalidInput,
    NoReference,
    NotFoundError,
    PermanentError,
    RetryableError,
    StagegateError,
)
from stagegate.lifecycle.stages import REGISTRY_ALIAS, Stage
from stagegate.registry import reference
from stagegate.registry.protocol import (
    DEPENDS_ON_TAG,
    STAGE_TAG,
    DatasetRef,
    RegistryVersion,
    VersionRef,
    valid_model_name,
)

WEBHOOK_NAME = "stagegate"
CODE_COMMIT_TAG = "mlflow.source.git.commit"
RUN_USER_TAG = "mlflow.user"
DATASET_CONTEXT_TAG = "mlflow.data.context"

_SEARCH_PAGE_SIZE = 1000
_WEBHOOK_PAGE_SIZE = 100
# Bounds on walking `stagegate/reference/`: a reference is a handful of files, not a tree.
_REFERENCE_MAX_FILES = 10_000
_REFERENCE_MAX_DEPTH = 8

_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})
_INVALID_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST"})
_CONFLICT_CODES = frozenset(
    {"ALREADY_EXISTS", "RESOURCE_ALREADY_EXISTS", "RESOURCE_CONFLICT", "ABORTED"}
)
_RETRYABLE_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
)
# Artifact locations the digest may read. Local paths would read this machine's disk, and
# `models:`/`runs:` would be resolved by mlflow against the process-global registry URI.
_LOCAL_SCHEMES = frozenset({"", "file", "models", "runs"})

# Seconds a request may wait for a connection or for each read, retries after the first try, and
# the backoff factor: a hung MLflow costs a call at most `call_bound_s()` (33 s with these).
HTTP_BOUNDS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
_BACKOFF_JITTER_S = 1.0  # MLflow's default MLFLOW_HTTP_REQUEST_BACKOFF_JITTER
_BACKOFF_MAX_S = 120.0  # urllib3's cap on one backoff


def bound_http() -> dict[str, str]:
    """Set MLflow's HTTP bounds the environment leaves unset; return those in force.

    Process-wide, because MLflow's client has no per-client setting: a value an operator set
    wins, and so does one set before this process built its first registry."""
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in HTTP_BOUNDS}


def call_bound_s(bounds: dict[str, str] | None = None) -> float:
    """Longest one MLflow call can take against a server that accepts and never answers:
    every try waits its timeout, and urllib3 sleeps factor * 2^(n-1) (plus jitter) before the
    n-th consecutive retry from the second on. A server that trickles bytes can take longer:
    the timeout bounds each read, not the whole answer."""
    bounds = bounds or {name: os.environ.get(name, v) for name, v in HTTP_BOUNDS.items()}
    timeout = float(bounds["MLFLOW_HTTP_REQUEST_TIMEOUT"])
    retries = int(bounds["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = float(bounds["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    backoff = sum(
        min(_BACKOFF_MAX_S, factor * 2.0 ** (n - 1)) + _BACKOFF_JITTER_S
        for n in range(2, retries + 1)
    )
    return timeout * (retries + 1) + backoff


def _raise_mapped(exc: MlflowException, what: str) -> NoReturn:
    code = str(exc.error_code)
    status = int(ERROR_CODE_TO_HTTP_STATUS.get(code, 500))
    detail = f"MLflow: {what}: {exc.message}"
    if code in _NOT_FOUND_CODES:
        raise NotFoundError(f"{what} not found in the MLflow registry") from exc
    if code in _INVALID_CODES:
        raise InvalidInput(detail) from exc
    if code in _CONFLICT_CODES:
        raise ConflictError(detail) from exc
    if code in _RETRYABLE_CODES or status >= 500 or status == 429:
        raise RetryableError(detail) from exc
    raise PermanentError(detail) from exc


@contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    """Translate MLflow's exceptions into Stagegate's; `what` names the object for messages."""
    try:
        yield
    except StagegateError:
        raise
    except MlflowException as exc:
        _raise_mapped(exc, what)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not valid_model_name(name):
        raise InvalidInput(f"invalid model name {name!r}")


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidInput(f"invalid model version {version!r}: expected an integer >= 1")


def parse_depends_on(value: str, *, model: str | None = None) -> tuple[VersionRef, ...]:
    """Parse `stagegate.depends_on` (`name:version,name:version`); InvalidInput if malformed.

    Blank values mean no dependencies. Entries may be padded with spaces. A model may appear
    once, and not depend on itself (`model`).
    """
    if not value.strip():
        return ()
    refs: list[VersionRef] = []
    seen: set[str] = set()
    for raw in value.split(","):
        entry = raw.strip()
        dep_name, sep, dep_version = entry.partition(":")
        dep_name, dep_version = dep_name.strip(), dep_version.strip()
        problem = None
        if not entry:
            problem = "empty entry"
        elif not sep:
            problem = "expected name:version"
        elif not valid_model_name(dep_name):
            problem = "invalid model name"
        elif not (dep_version.isascii() and dep_version.isdigit()) or int(dep_version) < 1:
            problem = "version must be an integer >= 1"
        elif dep_name in seen:
            problem = "model listed twice"
        elif dep_name == model:
            problem = "a model cannot depend on itself"
        if problem:
            raise InvalidInput(
                f"malformed {DEPENDS_ON_TAG} tag {value!r}: entry {entry!r}: {problem} "
                "(expected comma-separated name:version, e.g. 'embedder:3,tokenizer:1')"
            )
        seen.add(dep_name)
        refs.append(VersionRef(name=dep_name, version=int(dep_version)))
    return tuple(refs)


def _datasets(run: Any) -> tuple[DatasetRef, ...]:
    inputs = getattr(run, "inputs", None)
    refs: list[DatasetRef] = []
    for dataset_input in getattr(inputs, "dataset_inputs", None) or []:
        dataset = dataset_input.dataset
        tags = {tag.key: tag.value for tag in dataset_input.tags or []}
        refs.append(
            DatasetRef(
                name=str(dataset.name),
                digest=str(dataset.digest),
                source=str(dataset.source),
                context=tags.get(DATASET_CONTEXT_TAG),
                source_type=str(dataset.source_type or "") or None,
            )
        )
    return tuple(refs)


class MlflowRegistry:
    """`ModelRegistry` over an MLflow tracking server (tracking and registry at one URI).

    Reference data (`load_reference`) is capped at `reference_max_bytes`; an http(s) dataset
    source may be on a private network only with `reference_allow_private`; local dataset
    sources must lie under one of `reference_local_roots` when it is given.
    """

    def __init__(
        self,
        tracking_uri: str,
        *,
        reference_max_bytes: int = reference.MAX_REFERENCE_BYTES,
        reference_allow_private: bool = False,
        reference_local_roots: Sequence[Path] | None = None,
    ) -> None:
        self._tracking_uri = tracking_uri
        self.http_bounds = bound_http()
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.reference_max_bytes = reference_max_bytes
        self.reference_allow_private = reference_allow_private
        self.reference_local_roots = reference_local_roots

    @property
    def tracking_uri(self) -> str:
        return self._tracking_uri

    def get_version(self, name: str, version: int) -> RegistryVersion:
        _check_name(name)
        _check_version(version)
        what = f"model version {name}/{version}"
        with _mlflow_errors(what):
            mv: Any = self._client.get_model_version(name, str(version))
        run_id = cast(str | None, mv.run_id) or None
        run: Any = None
        if run_id:
            try:
                with _mlflow_errors(f"run {run_id} of {what}"):
                    run = self._client.get_run(run_id)
            except NotFoundError:
                run = None  # the run was purged; the version stands on its own
        run_tags: dict[str, str] = dict(run.data.tags) if run is not None else {}
        tags: dict[str, str] = {str(k): str(v) for k, v in (mv.tags or {}).items()}
        return RegistryVersion(
            name=str(mv.name),
            version=int(mv.version),
            source=str(mv.source or ""),
            run_id=run_id,
            creator=(str(mv.user_id) if mv.user_id else None) or run_tags.get(RUN_USER_TAG) or None,
            created_at=datetime.fromtimestamp(int(mv.creation_timestamp) / 1000, tz=UTC),
            tags=tags,
            aliases=tuple(str(a) for a in mv.aliases or ()),
            metrics={str(k): float(v) for k, v in run.data.metrics.items()} if run else {},
            params={str(k): str(v) for k, v in run.data.params.items()} if run else {},
            datasets=_datasets(run) if run is not None else (),
            code_commit=run_tags.get(CODE_COMMIT_TAG) or None,
            depends_on=parse_depends_on(tags.get(DEPENDS_ON_TAG, ""), model=name),
        )

    def list_versions(self) -> list[VersionRef]:
        refs: list[VersionRef] = []
        token: str | None = None
        with _mlflow_errors("model version search"):
            while True:
                page: Any = self._client.search_model_versions(
                    max_results=_SEARCH_PAGE_SIZE, page_token=token
                )
                refs.extend(VersionRef(name=str(mv.name), version=int(mv.version)) for mv in page)
                token = cast(str | None, page.token) or None
                if token is None:
                    break
        return sorted(set(refs), key=lambda ref: (ref.name, ref.version))

    def artifact_digest(self, name: str, version: int) -> str:
        with tempfile.TemporaryDirectory(prefix="stagegate-artifacts-") as tmp:
            return tree_digest(self._download(name, version, tmp))

    def predict(self, name: str, version: int, rows: pa.Table, *, digest: str | None) -> list[Any]:
        model_uri = f"models:/{name}/{version}"
        with tempfile.TemporaryDirectory(prefix="stagegate-score-") as tmp:
            root = self._download(name, version, tmp)
            if digest is not None and (found := tree_digest(root)) != digest:
                raise PermanentError(
                    f"{model_uri} changed since it was recorded: its artifact hashes to "
                    f"{found[:12]}, not {digest[:12]}"
                )
            with _mlflow_errors(f"loading {model_uri}"):
                model = mlflow.pyfunc.load_model(str(root))
            try:
                answers = model.predict(rows.to_pandas())
            except Exception as exc:  # the model's own code: any error is its answer
                raise PermanentError(
                    f"{model_uri} failed to score {rows.num_rows} rows: {exc}"
                ) from exc
        return _per_row(answers, rows.num_rows, model_uri)

    def _download(self, name: str, version: int, tmp: str) -> Path:
        """The version's model directory, downloaded under `tmp`."""
        _check_name(name)
        _check_version(version)
        model_uri = f"models:/{name}/{version}"
        # mlflow would resolve `models:/` against the process-global registry URI, not ours:
        # resolve it on this client (the same lookup mlflow does), then download from there.
        with _mlflow_errors(model_uri):
            location = str(self._client.get_model_version_download_uri(name, str(version)))
        scheme = urlparse(location).scheme.lower()
        if scheme in _LOCAL_SCHEMES or len(scheme) == 1:  # one letter: a Windows drive
            raise PermanentError(
                f"{model_uri} resolves to {location!r}, which is not remote artifact storage; "
                "run the MLflow server with proxied artifacts (--artifacts-destination)"
            )
        try:
            with _mlflow_errors(f"artifacts of {model_uri}"):
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=location,
                    dst_path=tmp,
                    tracking_uri=self._tracking_uri,
                    registry_uri=self._tracking_uri,
                )
        except OSError as exc:  # requests' errors are OSErrors too
            raise RetryableError(f"downloading artifacts of {model_uri}: {exc}") from exc
        root = Path(local)
        if not root.is_dir():
            raise PermanentError(f"{model_uri} resolved to a single file, not a model dir")
        return root

    def mirror_stage(self, name: str, version: int, stage: Stage) -> None:
        _check_name(name)
        _check_version(version)
        try:
            stage = Stage(stage)
        except ValueError as exc:
            raise InvalidInput(f"unknown stage {stage!r}") from exc
        what = f"model version {name}/{version}"
        with _mlflow_errors(what):
            mv: Any = self._client.get_model_version(name, str(version))
            if (mv.tags or {}).get(STAGE_TAG) != stage.value:
                self._client.set_model_version_tag(name, str(version), STAGE_TAG, stage.value)
            held = {str(alias) for alias in mv.aliases or ()}
            for alias_stage, alias in REGISTRY_ALIAS.items():
                if alias_stage is stage:
                    if alias not in held:
                        self._client.set_registered_model_alias(name, alias, str(version))
                elif alias in held:
                    self._client.delete_registered_model_alias(name, alias)

    def ensure_webhook(self, url: str, secret: str, events: list[str]) -> str:
        if not events:
            raise InvalidInput("a webhook needs at least one event")
        with _mlflow_errors(f"webhook {WEBHOOK_NAME!r}"):
            ours = sorted(
                (hook for hook in self._webhooks() if hook.name == WEBHOOK_NAME),
                key=lambda hook: (int(hook.creation_timestamp), str(hook.webhook_id)),
            )
            if not ours:
                created: Any = self._client.create_webhook(
                    name=WEBHOOK_NAME,
                    url=url,
                    events=cast(Any, list(events)),
                    description="Stagegate: model registry events",
                    secret=secret,
                    status="ACTIVE",
                )
                return str(created.webhook_id)
            keep, *duplicates = ours
            self._client.update_webhook(
                keep.webhook_id,
                url=url,
                events=cast(Any, list(events)),
                secret=secret,
                status="ACTIVE",
            )
            # Two webhooks with our name would deliver every event twice.
            for duplicate in duplicates:
                self._client.delete_webhook(duplicate.webhook_id)
            return str(keep.webhook_id)

    def load_reference(self, name: str, version: int) -> pa.Table:
        what, run_id, datasets = self._training_run(name, version)
        files = self._reference_artifacts(run_id, what)
        if files:
            return self._read_artifacts(run_id, files, what)
        return reference.read_datasets(
            datasets,
            max_bytes=self.reference_max_bytes,
            allow_private=self.reference_allow_private,
            local_roots=self.reference_local_roots,
            what=f"reference of {what}",
        )

    def describe_reference(self, name: str, version: int) -> str | None:
        try:
            what, run_id, datasets = self._training_run(name, version)
            if self._reference_artifacts(run_id, what):
                return f"runs:/{run_id}/{reference.REFERENCE_ARTIFACT_PATH}"
        except NoReference:
            return None
        return reference.describe_datasets(datasets)

    def _training_run(self, name: str, version: int) -> tuple[str, str, tuple[DatasetRef, ...]]:
        """(a label for messages, the version's run id, the run's datasets); NoReference when
        the version has no run left."""
        _check_name(name)
        _check_version(version)
        what = f"model version {name}/{version}"
        with _mlflow_errors(what):
            mv: Any = self._client.get_model_version(name, str(version))
        run_id = cast(str | None, mv.run_id) or None
        if run_id is None:
            raise NoReference(f"{what} has no training run to take reference data from")
        try:
            with _mlflow_errors(f"run {run_id} of {what}"):
                run: Any = self._client.get_run(run_id)
        except NotFoundError:
            raise NoReference(f"the training run {run_id} of {what} no longer exists") from None
        return what, run_id, _datasets(run)

    def _reference_artifacts(self, run_id: str, what: str) -> list[tuple[str, int]]:
        """(path, size) of every Parquet file under `stagegate/reference/` in the run."""
        found: list[tuple[str, int]] = []
        pending = [(reference.REFERENCE_ARTIFACT_PATH, 0)]
        while pending:
            folder, depth = pending.pop()
            try:
                with _mlflow_errors(f"artifacts of run {run_id} of {what}"):
                    entries: list[Any] = self._client.list_artifacts(run_id, folder)
            except OSError as exc:
                raise RetryableError(f"listing artifacts of run {run_id}: {exc}") from exc
            for entry in entries:
                path = str(entry.path)
                if reference.has_traversal(path):
                    continue  # only a broken artifact store would list such a path
                if entry.is_dir:
                    if depth + 1 >= _REFERENCE_MAX_DEPTH:
                        raise NoReference(
                            f"reference of {what}: {reference.REFERENCE_ARTIFACT_PATH}/ is "
                            f"nested deeper than {_REFERENCE_MAX_DEPTH} folders"
                        )
                    pending.append((path, depth + 1))
                elif path.lower().endswith(reference.PARQUET_SUFFIXES):
                    found.append((path, int(entry.file_size or 0)))
            if len(found) > _REFERENCE_MAX_FILES:
                raise NoReference(
                    f"reference of {what}: over {_REFERENCE_MAX_FILES} files under "
                    f"{reference.REFERENCE_ARTIFACT_PATH}/"
                )
        return sorted(found)

    def _read_artifacts(self, run_id: str, files: list[tuple[str, int]], what: str) -> pa.Table:
        label = f"reference of {what} (runs:/{run_id}/{reference.REFERENCE_ARTIFACT_PATH})"
        stored = sum(size for _, size in files)
        if stored > self.reference_max_bytes:
            raise NoReference(
                f"{label} is {reference.gib(stored)}, over the "
                f"{reference.gib(self.reference_max_bytes)} reference cap"
            )
        with tempfile.TemporaryDirectory(prefix="stagegate-reference-") as tmp:
            local: list[Path] = []
            for path, _ in files:
                folder = Path(tmp, posixpath.dirname(path))
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    with _mlflow_errors(f"artifact {path} of run {run_id}"):
                        got = self._client.download_artifacts(run_id, path, str(folder))
                    local.append(Path(got))
                except OSError as exc:
                    raise RetryableError(f"downloading {path} of run {run_id}: {exc}") from exc
            return reference.read_parquet_files(
                local, max_bytes=self.reference_max_bytes, what=label
            )

    def _webhooks(self) -> list[Any]:
        hooks: list[Any] = []
        token: str | None = None
        while True:
            page: Any = self._client.list_webhooks(max_results=_WEBHOOK_PAGE_SIZE, page_token=token)
            hooks.extend(page)
            token = cast(str | None, page.token) or None
            if token is None:
                return hooks


def log_reference(frame: Any, *, artifact_path: str = reference.REFERENCE_ARTIFACT_PATH) -> str:
    """Log `frame` (a pandas DataFrame or a pyarrow Table) as Parquet into the active MLflow
    run, where `load_reference` finds it: call it next to `log_model` in training code.
    Returns the artifact's `runs:/` URI. The pandas index is not kept."""
    import pandas as pd

    if isinstance(frame, pa.Table):
        table = frame
    elif isinstance(frame, pd.DataFrame):
        table = pa.Table.from_pandas(frame, preserve_index=False)
    else:
        raise InvalidInput(
            f"log_reference takes a pandas DataFrame or a pyarrow Table, not {type(frame)!r}"
        )
    if artifact_path.startswith("/") or reference.has_traversal(artifact_path):
        raise InvalidInput(f"artifact_path {artifact_path!r} must be relative, without '..'")
    run = mlflow.active_run()
    if run is None:
        raise InvalidInput("log_reference needs an active MLflow run (inside mlflow.start_run())")
    with tempfile.TemporaryDirectory(prefix="stagegate-reference-") as tmp:
        path = Path(tmp, "reference.parquet")
        pq.write_table(table, path)
        mlflow.log_artifact(str(path), artifact_path)
    return f"runs:/{run.info.run_id}/{artifact_path.strip('/')}/reference.parquet"


def _per_row(answers: Any, rows: int, what: str) -> list[Any]:
    """A pyfunc's batch answer as one JSON-like value per row (a DataFrame's row becomes an
    object, a 2-D array's row a list)."""
    if hasattr(answers, "to_dict") and hasattr(answers, "columns"):  # a DataFrame
        out: list[Any] = answers.to_dict(orient="records")
    elif hasattr(answers, "tolist"):  # an ndarray or a Series
        out = answers.tolist()
    else:
        out = list(answers)
    if len(out) != rows:
        raise PermanentError(f"{what} gave {len(out)} answers to {rows} rows")
    return out
