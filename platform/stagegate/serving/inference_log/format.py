"""The inference log's on-disk format: schemas, Hive partition paths, rows, whole-file writes."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import fsspec  # type: ignore[import-untyped]
import orjson
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.fs as pafs  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from fsspec.implementations.local import LocalFileSystem  # type: ignore[import-untyped]

from stagegate.serving.inference_log.records import InferenceRecord

FileSystem = Any  # an fsspec AbstractFileSystem (fsspec ships no type information)

TIMESTAMP = pa.timestamp("us", tz="UTC")

RECORD_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("key_hash", pa.string()),
        pa.field("inputs", pa.string()),  # JSON text; NULL for None
        pa.field("output", pa.string()),  # JSON text; NULL when the arm failed
        pa.field("status", pa.int16(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("at", TIMESTAMP, nullable=False),
    ]
)

LABEL_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),  # JSON text, `null` included
        pa.field("at", TIMESTAMP, nullable=False),
    ]
)

# The Hive partition column that is not stored in the files themselves.
DATE_FIELD = pa.field("date", pa.date32())

# A leading underscore keeps label files out of pyarrow's discovery of the records under root.
LABELS_DIR = "_labels"

LABEL_GLOB = f"{LABELS_DIR}/date=*/*.parquet"

# Odd values (sets, decimals, numpy scalars) are logged as text rather than losing the record.
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> str:
    return orjson.dumps(value, default=str, option=_JSON_OPTIONS).decode()


def loads(text: str | None) -> Any:
    return None if text is None else orjson.loads(text)


# Object stores publish an object only when its upload completes, and their folders are only
# key prefixes: nothing to create, and s3fs's makedirs would create a missing bucket.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})


def open_root(root_url: str) -> tuple[FileSystem, str]:
    """The filesystem and root path of an fsspec URL (a plain path is a local folder).

    Credentials and endpoint come from the filesystem's own configuration: for `s3://`, the
    standard AWS variables (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for MinIO and the like)."""
    fs, path = fsspec.core.url_to_fs(root_url)
    if not is_local(fs):
        # No cached listings: other processes keep adding files, and a long-lived reader's
        # cache (fsspec keeps one per filesystem instance, without expiry) would hide them.
        fs, path = fsspec.core.url_to_fs(root_url, use_listings_cache=False)
    return fs, str(path).rstrip("/")


def is_local(fs: FileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def is_object_store(fs: FileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return not OBJECT_STORES.isdisjoint(protocols)


def check_bucket(fs: FileSystem, root: str, root_url: str) -> None:
    """On an object store, fail clearly when the log's bucket is missing or refused, rather
    than reading it as an empty log. Needs list rights on the bucket (readers need them)."""
    if not is_object_store(fs):
        return
    bucket = root.split("/", 1)[0]
    try:
        fs.info(bucket)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"inference log {root_url}: the bucket {bucket!r} does not exist"
        ) from exc
    except PermissionError as exc:
        raise PermissionError(
            f"inference log {root_url}: access to the bucket {bucket!r} was refused ({exc});"
            " check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE)"
        ) from exc


def open_for_reading(root_url: str) -> tuple[FileSystem, str]:
    """`open_root`, and the bucket checked (one request) on object stores."""
    fs, root = open_root(root_url)
    check_bucket(fs, root, root_url)
    return fs, root


def arrow_filesystem(fs: FileSystem) -> Any:
    # pyarrow's own local filesystem is much faster than going through fsspec.
    return pafs.LocalFileSystem() if is_local(fs) else fs


def utc(at: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def segment(key: str, value: str) -> str:
    # Quoted, so any model name is one path segment; pyarrow and DuckDB both unquote it.
    return f"{key}={quote(value, safe='')}"


def partition_dir(root: str, **values: str) -> str:
    return "/".join([root, *(segment(key, value) for key, value in values.items())])


def record_glob(model: str | None = None) -> str:
    """The record files of one model, or of all, relative to the root."""
    folder = "model=*" if model is None else segment("model", model)
    return f"{folder}/date=*/*.parquet"


def records_table(records: Sequence[InferenceRecord]) -> Any:
    def text(value: Any) -> str | None:
        return None if value is None else dumps(value)

    columns = {
        "request_id": [r.request_id for r in records],
        "model": [r.model for r in records],
        "version": [r.version for r in records],
        "role": [r.role for r in records],
        "key_hash": [r.key_hash for r in records],
        "inputs": [text(r.inputs) for r in records],
        "output": [text(r.output) for r in records],
        "status": [r.status for r in records],
        "latency_ms": [r.latency_ms for r in records],
        "at": [utc(r.at) for r in records],
    }
    return pa.Table.from_pydict(columns, schema=RECORD_SCHEMA)


def records_from_table(table: Any) -> list[InferenceRecord]:
    """Decode a table of the record schema (from `read_records`) back into records."""
    rows = table.select(RECORD_SCHEMA.names).to_pylist()
    return [
        InferenceRecord(**{**row, "inputs": loads(row["inputs"]), "output": loads(row["output"])})
        for row in rows
    ]


def write_parquet(
    fs: FileSystem,
    directory: str,
    table: Any,
    *,
    ordered: bool = False,
    dictionary: bool | list[str] = True,
) -> str:
    """Write one whole file that readers either see complete or not at all (locally and on
    object stores).

    `ordered` puts the write time (ns) in the name, so the files of a folder list in the order
    they were written (`part-<time>-<uuid>.parquet`). `dictionary`: the columns to dictionary-
    encode (True: all)."""
    options = {"compression": "zstd", "use_dictionary": dictionary}
    stamp = f"{time.time_ns():020d}-" if ordered else ""
    name = f"part-{stamp}{uuid.uuid4().hex}.parquet"
    if not is_local(fs):
        # Encoded in memory, then sent to its final name in one call (object stores have no
        # rename): an object store (S3) publishes it only when the upload completes, and a
        # failed encoding sends nothing (fsspec's files upload what they hold when closed, even
        # by an exception). Other remote filesystems may show a partial file while it is sent.
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **options)
        if not is_object_store(fs):
            fs.makedirs(directory, exist_ok=True)
        fs.pipe_file(f"{directory}/{name}", sink.getvalue().to_pybytes())
        return f"{directory}/{name}"
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, name)
    # Dot-prefixed and not *.parquet: pyarrow's discovery and our globs both skip it, and one
    # orphaned by a crash stays invisible.
    temp = os.path.join(directory, f".{name}.tmp")
    try:
        with open(temp, "wb") as f:
            pq.write_table(table, f, **options)
            f.flush()
            os.fsync(f.fileno())  # never rename an empty file into place after a power loss
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return final
