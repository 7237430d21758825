"""Reading the inference log: pyarrow datasets with partition pruning, and DuckDB views."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.dataset as ds  # type: ignore[import-untyped]

from stagegate.errors import InvalidInput
from stagegate.serving.inference_log.format import (
    DATE_FIELD,
    LABEL_GLOB,
    LABEL_SCHEMA,
    RECORD_SCHEMA,
    TIMESTAMP,
    FileSystem,
    arrow_filesystem,
    is_local,
    open_for_reading,
    partition_dir,
    record_glob,
    utc,
)


def aware(at: datetime, name: str) -> datetime:
    """`at` in UTC; InvalidInput (a 4xx) when it is naive."""
    if at.tzinfo is None:
        raise InvalidInput(f"{name} must be timezone-aware")
    return utc(at)


def read_records(
    root_url: str,
    *,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Any:
    """Records with since <= at < until, ordered by `at`; an empty table if there are none."""
    fs, root = open_for_reading(root_url)
    base = partition_dir(root, model=model) if model is not None else root
    if not fs.exists(base):
        return RECORD_SCHEMA.empty_table()
    partitions = [pa.field("model", pa.string()), DATE_FIELD] if model is None else [DATE_FIELD]
    dataset = ds.dataset(
        base,
        schema=pa.schema([*RECORD_SCHEMA, DATE_FIELD]),
        format="parquet",
        filesystem=arrow_filesystem(fs),
        partitioning=ds.partitioning(pa.schema(partitions), flavor="hive"),
    )
    conditions = []
    if since is not None:  # the date conditions prune whole folders, the `at` ones rows
        start = aware(since, "since")
        conditions += [
            ds.field("date") >= start.date(),
            ds.field("at") >= pa.scalar(start, TIMESTAMP),
        ]
    if until is not None:
        end = aware(until, "until")
        conditions += [ds.field("date") <= end.date(), ds.field("at") < pa.scalar(end, TIMESTAMP)]
    where = None
    for condition in conditions:
        where = condition if where is None else where & condition
    table = dataset.to_table(columns=RECORD_SCHEMA.names, filter=where)
    return table.sort_by([("at", "ascending"), ("request_id", "ascending")])


def _files(fs: FileSystem, root: str, pattern: str) -> list[str]:
    # The listing is the snapshot: files written after it are not seen, and temp files never.
    paths = sorted(fs.glob(f"{root}/{pattern}"))
    return paths if is_local(fs) else [fs.unstrip_protocol(p) for p in paths]


def connect(root_url: str, *, model: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with views `inference` and `labels` (each with a `date` column).

    `at` is a reserved word in DuckDB 2: write it `"at"` in SQL.
    `model` limits the `inference` view to that model's files, which saves listing the others.
    """
    fs, root = open_for_reading(root_url)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    if not is_local(fs):
        con.register_filesystem(fs)
    views = (
        ("inference", record_glob(model), RECORD_SCHEMA),
        ("labels", LABEL_GLOB, LABEL_SCHEMA),
    )
    for name, pattern, schema in views:
        files = _files(fs, root, pattern)
        if files:
            relation = con.read_parquet(files, hive_partitioning=True, union_by_name=True)
            relation.create_view(name)
        else:  # read_parquet refuses an empty list; keep the view's columns for SQL anyway
            con.register(name, pa.schema([*schema, DATE_FIELD]).empty_table())
    return con


def query(root_url: str, sql: str, params: object = None) -> Any:
    """Run one SELECT over the views of `connect`; the result as an Arrow table."""
    with connect(root_url) as con:
        return con.sql(sql, params=params).to_arrow_table()
