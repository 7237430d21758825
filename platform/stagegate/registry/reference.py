"""Reading reference data: the training data a version's traffic is compared with.

`mlflow.py` finds where the reference is (docs/monitoring.md, "Reference data"); this module
reads it, from downloaded Parquet artifacts or from a dataset source (a local Parquet or CSV
file, or an http(s) URL that passes `stagegate.outbound`), within a size cap. Whatever cannot
be read permanently is `NoReference` with the reason; failures that may pass (connection
errors, 5xx) are `RetryableError`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from stagegate.errors import InvalidInput, NoReference, RetryableError
from stagegate.outbound import resolve_url
from stagegate.registry.protocol import DatasetRef

REFERENCE_ARTIFACT_PATH = "stagegate/reference"
TRAINING_CONTEXT = "training"
# Measured as Arrow would hold it: Parquet's uncompressed size, a CSV's file size.
MAX_REFERENCE_BYTES = 2 << 30
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)
MAX_FOLDER_ENTRIES = 10_000  # a source like `/` must not walk the whole disk
HTTP_TIMEOUT = httpx.Timeout(30.0, read=60.0)
MAX_REDIRECTS = 3
_CHUNK_BYTES = 1 << 20
_PANDAS_INDEX_RE = re.compile(r"^__index_level_\d+__$")  # pandas' index, not a feature


def gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def has_traversal(path: str) -> bool:
    """True if any segment of `path`, plain or percent-decoded (three times), is `..`."""
    text = path
    for _ in range(4):
        if ".." in re.split(r"[/\\]", text):
            return True
        text = unquote(text)
    return False


# -- reading files ------------------------------------------------------------------------


def read_parquet_files(files: Sequence[Path], *, max_bytes: int, what: str) -> pa.Table:
    """One table from Parquet files with one schema, refused above `max_bytes` uncompressed."""
    if not files:
        raise NoReference(f"{what}: no Parquet files")
    total = 0
    try:
        for file in files:
            meta = pq.ParquetFile(file).metadata
            groups = range(meta.num_row_groups)
            uncompressed = sum(meta.row_group(i).total_byte_size for i in groups)
            total += max(uncompressed, file.stat().st_size)
    except (OSError, pa.ArrowException) as exc:
        raise NoReference(f"{what}: not readable as Parquet: {exc}") from exc
    if total > max_bytes:
        raise NoReference(
            f"{what} is {gib(total)} uncompressed, over the {gib(max_bytes)} reference cap"
        )
    try:
        tables = [pq.read_table(file) for file in files]
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    except (OSError, pa.ArrowException) as exc:
        raise NoReference(f"{what}: the Parquet files do not make one table: {exc}") from exc
    return _drop_pandas_index(table)


def read_csv_file(file: Path, *, max_bytes: int, what: str) -> pa.Table:
    size = file.stat().st_size
    if size > max_bytes:
        raise NoReference(f"{what} is {gib(size)}, over the {gib(max_bytes)} reference cap")
    try:
        return pa_csv.read_csv(file)
    except (OSError, pa.ArrowException) as exc:
        raise NoReference(f"{what}: not readable as CSV: {exc}") from exc


def _drop_pandas_index(table: pa.Table) -> pa.Table:
    index = [name for name in table.column_names if _PANDAS_INDEX_RE.match(name)]
    return table.drop_columns(index) if index else table


def read_local(
    path: str, *, max_bytes: int, roots: Sequence[Path] | None = None, what: str
) -> pa.Table:
    """A local Parquet or CSV file, or a folder of Parquet files, given by an absolute path."""
    if has_traversal(path):
        raise NoReference(f"{what}: path traversal ('..') in {path!r}")
    local = Path(path)
    if not local.is_absolute():
        raise NoReference(f"{what}: {path!r} is a relative path; an absolute one is needed")
    try:
        real = local.resolve(strict=True)  # symlinks followed: the target is what is judged
    except (OSError, RuntimeError):
        raise NoReference(f"{what}: {path!r} does not exist on this machine") from None
    if roots is not None and not any(real.is_relative_to(root.resolve()) for root in roots):
        allowed = ", ".join(str(root) for root in roots) or "(none)"
        raise NoReference(f"{what}: {path!r} is outside the allowed folders ({allowed})")
    if real.is_dir():
        files = _parquet_files_under(real, path, what)
        if not files:
            raise NoReference(f"{what}: folder {path!r} holds no Parquet files")
        return read_parquet_files(files, max_bytes=max_bytes, what=what)
    suffix = real.suffix.lower()
    if real.is_file() and suffix in PARQUET_SUFFIXES:
        return read_parquet_files([real], max_bytes=max_bytes, what=what)
    if real.is_file() and suffix in CSV_SUFFIXES:
        return read_csv_file(real, max_bytes=max_bytes, what=what)
    raise NoReference(
        f"{what}: {path!r} is not a Parquet (.parquet, .pq) or CSV (.csv) file, "
        "nor a folder of Parquet files"
    )


def _parquet_files_under(root: Path, shown: str, what: str) -> list[Path]:
    """The Parquet files in a folder tree, in path order; symlinks inside are not followed."""
    files: list[Path] = []
    seen = 0
    for folder, dirs, names in os.walk(root):
        seen += len(dirs) + len(names)
        if seen > MAX_FOLDER_ENTRIES:
            raise NoReference(f"{what}: folder {shown!r} holds over {MAX_FOLDER_ENTRIES} entries")
        for name in names:
            file = Path(folder, name)
            if file.suffix.lower() in PARQUET_SUFFIXES and not file.is_symlink() and file.is_file():
                files.append(file)
    return sorted(files)


# -- reading URLs --------------------------------------------------------------------------


def fetch_http(url: str, dst: Path, *, max_bytes: int, allow_private: bool, what: str) -> Path:
    """Download `url` into the folder `dst`, checking it and every redirect with
    `outbound.resolve_url` and connecting to the checked address (no second DNS lookup)."""
    current = url
    with httpx.Client(trust_env=False, follow_redirects=False, timeout=HTTP_TIMEOUT) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                checked = resolve_url(current, allow_private=allow_private)
            except InvalidInput as exc:
                raise NoReference(f"{what}: {exc.detail}") from exc
            extensions = {"sni_hostname": checked.host} if checked.scheme == "https" else {}
            try:
                with client.stream(
                    "GET",
                    checked.pinned_url,
                    headers={"Host": checked.host_header},
                    extensions=extensions,
                ) as response:
                    if response.is_redirect and "location" in response.headers:
                        current = urljoin(checked.url, response.headers["location"])
                        continue
                    _check_status(response, current, what)
                    return _save(response, dst, checked.url, max_bytes=max_bytes, what=what)
            except httpx.TransportError as exc:
                raise RetryableError(f"{what}: fetching {current!r} failed: {exc}") from exc
    raise NoReference(f"{what}: more than {MAX_REDIRECTS} redirects from {url!r}")


def _check_status(response: httpx.Response, url: str, what: str) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise RetryableError(f"{what}: {url!r} answered {status}")
    if status != 200:
        raise NoReference(f"{what}: {url!r} answered {status}")


def _save(response: httpx.Response, dst: Path, url: str, *, max_bytes: int, what: str) -> Path:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise NoReference(
            f"{what}: {url!r} is {gib(int(declared))}, over the {gib(max_bytes)} reference cap"
        )
    name = Path(urlsplit(url).path).name or "download"
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    received = 0
    path = dst / "download"
    with path.open("wb") as out:
        for chunk in response.iter_bytes(_CHUNK_BYTES):
            received += len(chunk)
            if received > max_bytes:  # chunked, or a Content-Length that lied
                raise NoReference(f"{what}: {url!r} is over the {gib(max_bytes)} reference cap")
            out.write(chunk)
    with path.open("rb") as head:
        magic = head.read(4)
    # The bytes decide Parquet; CSV has no magic number, so the name or media type must say so.
    if magic == b"PAR1":
        return path.rename(dst / "download.parquet")
    if name.lower().endswith(CSV_SUFFIXES) or content_type in {"text/csv", "application/csv"}:
        return path.rename(dst / "download.csv")
    raise NoReference(
        f"{what}: {url!r} is neither Parquet nor CSV (name {name!r}, type {content_type!r})"
    )


# -- dataset inputs ------------------------------------------------------------------------


def dataset_location(ref: DatasetRef) -> str | None:
    """The file path or URL of a dataset's source: MLflow stores `{"uri": ...}` (local and
    object-store sources) or `{"url": ...}` (http); a plain string is taken as is."""
    try:
        doc = json.loads(ref.source)
    except ValueError:
        return ref.source or None
    if isinstance(doc, dict):
        for key in ("uri", "url"):
            if isinstance(doc.get(key), str) and doc[key]:
                return str(doc[key])
        return None
    return ref.source if isinstance(doc, str) else None


def candidates(datasets: Iterable[DatasetRef]) -> list[DatasetRef]:
    """The datasets a reference may come from: those logged with context "training", or,
    when none has it, every dataset, in the order they were logged."""
    every = list(datasets)
    training = [d for d in every if d.context == TRAINING_CONTEXT]
    return training or every


def _local_path(location: str) -> str | None:
    """The path of a local location (`/abs/path` or `file:` URI), else None."""
    try:
        parts = urlsplit(location)
    except ValueError:  # an invalid bracketed host
        return None
    if parts.scheme == "" and not parts.netloc:
        return location
    if parts.scheme.lower() == "file" and parts.netloc in ("", "localhost"):
        return unquote(parts.path)
    return None


def unsupported(ref: DatasetRef) -> str | None:
    """Why a dataset's source cannot be a reference (without reading it); None if it may."""
    location = dataset_location(ref)
    kind = f" of type {ref.source_type!r}" if ref.source_type else ""
    if location is None:
        return f"dataset {ref.name!r}: its source{kind} names no file or URL"
    if has_traversal(location):
        return f"dataset {ref.name!r}: path traversal ('..') in source {location!r}"
    if _local_path(location) is not None:
        return None
    scheme = location.split(":", 1)[0].lower() if ":" in location else ""
    if scheme in ("http", "https"):
        return None  # the URL itself is checked (`outbound`) right before it is fetched
    return (
        f"dataset {ref.name!r}: source {location!r} is not a local file or an http(s) URL; "
        f"log the data as Parquet under {REFERENCE_ARTIFACT_PATH}/ in the training run instead"
    )


def describe_datasets(datasets: Iterable[DatasetRef]) -> str | None:
    """The dataset source `read_datasets` would read first, or None."""
    for ref in candidates(datasets):
        if unsupported(ref) is None:
            return dataset_location(ref)
    return None


def read_datasets(
    datasets: Iterable[DatasetRef],
    *,
    max_bytes: int = MAX_REFERENCE_BYTES,
    allow_private: bool = False,
    local_roots: Sequence[Path] | None = None,
    what: str,
) -> pa.Table:
    """The first candidate dataset whose source is a local file or an http(s) URL, read.
    NoReference naming every refused source when there is none."""
    pool = candidates(datasets)
    if not pool:
        raise NoReference(f"{what}: no Parquet under {REFERENCE_ARTIFACT_PATH}/ and no datasets")
    refusals = [unsupported(ref) for ref in pool]
    chosen = next((ref for ref, why in zip(pool, refusals, strict=True) if why is None), None)
    if chosen is None:
        raise NoReference(
            f"{what}: no Parquet under {REFERENCE_ARTIFACT_PATH}/, and no readable dataset: "
            + "; ".join(why for why in refusals if why)
        )
    location = dataset_location(chosen)
    assert location is not None
    label = f"{what}: dataset {chosen.name!r} ({location})"
    local = _local_path(location)
    if local is not None:
        return read_local(local, max_bytes=max_bytes, roots=local_roots, what=label)
    with tempfile.TemporaryDirectory(prefix="stagegate-reference-") as tmp:
        path = fetch_http(
            location, Path(tmp), max_bytes=max_bytes, allow_private=allow_private, what=label
        )
        if path.suffix == ".csv":
            return read_csv_file(path, max_bytes=max_bytes, what=label)
        return read_parquet_files([path], max_bytes=max_bytes, what=label)
