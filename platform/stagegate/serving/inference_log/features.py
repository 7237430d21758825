"""The inference log's features: each scored input row, typed, with its prediction.

The writer decodes every answered request's body (`decode.py`) in its background thread and
writes the rows (`FeatureFiles`) to `_features/model=<m>/date=<d>/part-*.parquet` under the
log root, beside the record files (the leading underscore keeps them out of the records'
discovery). Columns: `request_id, version, role, at, row`, the features, then the prediction
columns. Only answers with a 2xx status give rows: each arm's rows are what that arm scored.

`read_features` reads a model's rows back by window. Files written at different times may
type a column differently; they are unified by `unified_type`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from itertools import chain
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.dataset as ds  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from stagegate.serving.inference_log.decode import (
    PREDICTION,
    Columns,
    Inputs,
    Undecodable,
    column_array,
    decode_inputs,
    prediction_columns,
    sample,
)
from stagegate.serving.inference_log.format import (
    TIMESTAMP,
    FileSystem,
    arrow_filesystem,
    open_for_reading,
    partition_dir,
    utc,
    write_parquet,
)
from stagegate.serving.inference_log.read import aware
from stagegate.serving.inference_log.records import InferenceRecord, Role

log = logging.getLogger(__name__)

# A leading underscore, as the labels: pyarrow's discovery of the records skips the folder.
FEATURES_DIR = "_features"

META_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("role", pa.string(), nullable=False),
        pa.field("at", TIMESTAMP, nullable=False),  # the record's `at`
        pa.field("row", pa.int32(), nullable=False),  # the row's index in its request
    ]
)

# The order of the rows within a file.
ORDER = [(name, "ascending") for name in ("at", "request_id", "role", "row")]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass
class FeatureCounts:
    """What the decoding made of the records so far (the writer's `features`)."""

    rows: int = 0  # feature rows written
    undecodable: int = 0  # answered records whose body could not be decoded: no rows
    sampled: int = 0  # records over MAX_ROWS rows, of which every k-th row was kept
    unmatched: int = 0  # records whose output is not one prediction per row: no predictions
    failed_rows: int = 0  # rows decoded but not written (the write failed; not retried)
    # Rows decoded and waiting to be written are in none of these.

    def add(self, other: FeatureCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class _Group:
    """The JSON requests of a batch with the same feature and prediction columns."""

    features: tuple[str, ...]
    predictions: tuple[str, ...]
    rows: list[Sequence[Any]] = field(default_factory=list)  # every request's rows, in order
    answers: list[tuple[Sequence[Any], ...]] = field(default_factory=list)  # per request
    ids: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    at_us: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    sampled: list[tuple[int, int]] = field(default_factory=list)  # (request, step)

    def table(self) -> Any:
        sizes = np.asarray(self.sizes)
        owner = pa.array(np.repeat(np.arange(len(sizes)), sizes))
        meta = [
            pa.array(self.ids, pa.string()).take(owner),
            pa.array(np.repeat(np.asarray(self.versions, dtype=np.int32), sizes)),
            pa.array(self.roles, pa.string()).take(owner),
            pa.array(np.repeat(np.asarray(self.at_us, dtype=np.int64), sizes)).cast(TIMESTAMP),
            pa.array(self._row_numbers(sizes)),
        ]
        # All the batch's rows become columns in one transposition, in C.
        width = len(self.features)
        features = zip(*self.rows, strict=True) if self.rows and width else [()] * width
        predictions = (
            list(chain.from_iterable(parts)) for parts in zip(*self.answers, strict=True)
        )
        columns = [column_array(values) for values in (*features, *predictions)]
        names = [*META_SCHEMA.names, *self.features, *self.predictions]
        return pa.Table.from_arrays([*meta, *columns], names=names)

    def _row_numbers(self, sizes: Any) -> Any:
        """Each row's index in its request: 0, 1, … per request (every k-th when sampled)."""
        starts = np.cumsum(sizes) - sizes
        numbers = np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)
        for request, step in self.sampled:
            numbers[starts[request] : starts[request] + sizes[request]] *= step
        return numbers.astype(np.int32)


class FeatureBatch:
    """The feature rows of some records, built into one table (`table()`)."""

    def __init__(self) -> None:
        self.counts = FeatureCounts()
        self._groups: dict[tuple[tuple[str, ...], tuple[str, ...]], _Group] = {}  # JSON bodies
        self._tables: list[Any] = []  # CSV and Parquet bodies: a table each, meta included

    def add(self, record: InferenceRecord) -> None:
        if not 200 <= record.status < 300 or (record.body is None and record.inputs is None):
            return
        try:
            inputs = decode_inputs(record.body, record.content_type, record.inputs)
        except Undecodable as exc:
            self.counts.undecodable += 1
            log.debug("request %s: no features: %s", record.request_id, exc)
            return
        if inputs.count == 0:
            return
        predictions = prediction_columns(record.output, inputs.count)
        if predictions is None:
            self.counts.unmatched += 1
            predictions = {}
        step = sample(inputs.count)
        if step > 1:
            self.counts.sampled += 1
            predictions = {name: values[::step] for name, values in predictions.items()}
        if inputs.table is None:
            self._add_rows(record, inputs, predictions, step)
        else:
            self._add_table(record, inputs.table, predictions, step)

    def _add_rows(
        self, record: InferenceRecord, inputs: Inputs, predictions: Columns, step: int
    ) -> None:
        key = (inputs.names, tuple(predictions))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(*key)
        rows = inputs.rows if step == 1 else inputs.rows[::step]
        if step > 1:
            group.sampled.append((len(group.sizes), step))
        group.rows.extend(rows)
        group.answers.append(tuple(predictions.values()))
        group.ids.append(record.request_id)
        group.versions.append(record.version)
        group.roles.append(str(record.role))
        group.at_us.append((utc(record.at) - _EPOCH) // _MICROSECOND)
        group.sizes.append(len(rows))

    def _add_table(
        self, record: InferenceRecord, table: Any, predictions: Columns, step: int
    ) -> None:
        index = np.arange(0, table.num_rows, step, dtype=np.int32)
        if step > 1:
            table = table.take(pa.array(index))
        rows = table.num_rows
        at_us = (utc(record.at) - _EPOCH) // _MICROSECOND
        meta = [
            pa.array([record.request_id] * rows, pa.string()),
            pa.array(np.full(rows, record.version, dtype=np.int32)),
            pa.array([str(record.role)] * rows, pa.string()),
            pa.array(np.full(rows, at_us, dtype=np.int64)).cast(TIMESTAMP),
            pa.array(index),
        ]
        arrays = [*meta, *table.columns, *map(column_array, predictions.values())]
        names = [*META_SCHEMA.names, *table.column_names, *predictions]
        self._tables.append(pa.Table.from_arrays(arrays, names=names))

    def table(self) -> Any | None:
        """Every row added so far, in one table of unified types; None when there are none."""
        parts = [group.table() for group in self._groups.values()] + self._tables
        return unify_tables(parts) if parts else None


def feature_table(records: Sequence[InferenceRecord]) -> tuple[Any | None, FeatureCounts]:
    """The feature rows of `records` (None when they give none), and what decoding counted."""
    batch = FeatureBatch()
    for record in records:
        batch.add(record)
    return batch.table(), batch.counts


class FeatureFiles:
    """Feature rows gathered over the writer's batches, written one file per partition when
    it holds `flush_rows` rows or its oldest rows are `flush_interval_s` old.

    Much bigger files than the records', because a reader pays for every file: a million
    rows in 1,000-row files read six times slower than in 100,000-row ones (measured). The
    price: rows wait longer to be written, and a crash loses those waiting (the records,
    written first, still hold the JSON inputs).
    """

    def __init__(
        self, fs: FileSystem, root: str, *, flush_rows: int, flush_interval_s: float
    ) -> None:
        self._fs = fs
        self._root = f"{root}/{FEATURES_DIR}"
        self._flush_rows = flush_rows
        self._interval = flush_interval_s
        self._waiting: dict[tuple[str, date], list[Any]] = {}
        self._since: dict[tuple[str, date], float] = {}

    def add(self, model: str, day: date, records: Sequence[InferenceRecord]) -> FeatureCounts:
        """Decode the records (already written) of one partition; keep their rows to write."""
        try:
            table, counts = feature_table(records)
        except Exception:  # a bug here must never stop the records
            log.exception("inference log: decoding the features of %d records failed", len(records))
            return FeatureCounts()
        if table is not None:
            self._waiting.setdefault((model, day), []).append(table)
            self._since.setdefault((model, day), time.monotonic())
        return counts

    def flush(self, *, everything: bool = False) -> FeatureCounts:
        """Write the partitions that are due (all of them with `everything`)."""
        counts = FeatureCounts()
        now = time.monotonic()
        for key in list(self._waiting):
            tables = self._waiting[key]
            rows = sum(t.num_rows for t in tables)
            due = rows >= self._flush_rows or now - self._since[key] >= self._interval
            if not (everything or due):
                continue
            del self._waiting[key], self._since[key]
            model, day = key
            try:
                table = unify_tables(tables).sort_by(ORDER)
                directory = partition_dir(self._root, model=model, date=day.isoformat())
                # Dictionaries for text only: on numbers they cost 2.5 times the CPU to write
                # and save nothing (measured on the benchmark's 100,000-row files).
                text = [f.name for f in table.schema if pa.types.is_string(f.type)]
                write_parquet(self._fs, directory, table, ordered=True, dictionary=text)
            except Exception:
                log.exception("inference log: writing %d feature rows failed", rows)
                counts.failed_rows += rows
            else:
                counts.rows += rows
        return counts


# -- one schema for tables that disagree ----------------------------------------------------


def unified_type(types: Sequence[Any]) -> Any:
    """The type of a column that batches typed differently.

    A batch without the column, or with only nulls in it, does not count (its rows read as
    null). One type left: that type. Integers and floats: float64 (integers beyond 2**53
    lose precision). Any other mix: string, each value as Arrow casts it to text (true, 3, 2.5).
    """
    kinds = {t for t in types if not pa.types.is_null(t)}
    if not kinds:
        return pa.null()
    if len(kinds) == 1:
        return kinds.pop()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in kinds):
        return pa.float64()
    return pa.string()


def _is_prediction(name: str) -> bool:
    return name == PREDICTION or name.startswith(PREDICTION + ".")


def unify_schemas(schemas: Sequence[Any]) -> Any:
    """The meta columns, then the features, then the predictions, each in first-seen order."""
    types: dict[str, list[Any]] = {}
    for schema in schemas:
        for column in schema:
            types.setdefault(column.name, []).append(column.type)
    meta = set(META_SCHEMA.names)
    rest = [name for name in types if name not in meta]
    ordered = [n for n in rest if not _is_prediction(n)] + [n for n in rest if _is_prediction(n)]
    return pa.schema([*META_SCHEMA, *(pa.field(n, unified_type(types[n])) for n in ordered)])


def conform(table: Any, schema: Any) -> Any:
    """`table` with exactly `schema`'s columns: missing ones null, others cast to its types."""
    arrays = []
    for target in schema:
        index = table.schema.get_field_index(target.name)
        if index < 0:
            arrays.append(pa.nulls(table.num_rows, target.type))
            continue
        column = table.column(index)
        same = column.type == target.type
        arrays.append(column if same else column.cast(target.type, safe=False))
    return pa.Table.from_arrays(arrays, schema=schema)


def unify_tables(tables: Sequence[Any]) -> Any:
    schema = unify_schemas([t.schema for t in tables])
    return pa.concat_tables([conform(t, schema) for t in tables])


# -- reading ------------------------------------------------------------------------------------


def _day_of(folder: str) -> date | None:
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith("date="):
        return None
    try:
        return date.fromisoformat(name[5:])
    except ValueError:
        return None


def _window_files(
    fs: FileSystem, base: str, start: datetime | None, end: datetime | None
) -> list[str]:
    """The files of the date folders that can hold rows of [start, end): pruned by name."""
    if not fs.exists(base):
        return []
    files: list[str] = []
    for folder in sorted(fs.ls(base, detail=False)):
        day = _day_of(folder)
        if day is None or (start and day < start.date()) or (end and day > end.date()):
            continue
        for path in sorted(fs.ls(folder, detail=False)):
            name = path.rsplit("/", 1)[-1]
            # Temp files (`.part-….parquet.tmp`) are skipped: readers see whole files only.
            if name.endswith(".parquet") and not name.startswith("."):
                files.append(path)
    return files


def read_features(
    root_url: str,
    *,
    model: str,
    version: int | None = None,
    role: Role | str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Any:
    """The feature rows of `model` with since <= at < until (of that version and role when
    given); the meta columns alone when there are none.

    Rows come as written: date by date, file by file, each file ordered by `at`, request id,
    role and row. Files may overlap in time (a slow answer is written after faster answers to
    later requests): `sort_by` for a strict order, about half a second on a million rows.
    """
    start = None if since is None else aware(since, "since")
    end = None if until is None else aware(until, "until")
    fs, root = open_for_reading(root_url)
    files = _window_files(fs, partition_dir(f"{root}/{FEATURES_DIR}", model=model), start, end)
    if not files:
        return META_SCHEMA.empty_table()
    arrow_fs = arrow_filesystem(fs)
    where = None
    conditions = []
    if version is not None:
        conditions.append(ds.field("version") == version)
    if role is not None:
        conditions.append(ds.field("role") == str(role))
    if start is not None:
        conditions.append(ds.field("at") >= pa.scalar(start, TIMESTAMP))
    if end is not None:
        conditions.append(ds.field("at") < pa.scalar(end, TIMESTAMP))
    for condition in conditions:
        where = condition if where is None else where & condition
    # Consecutive files of one schema are scanned together (threads, row filter), then cast
    # to the schema that unifies them all (from a footer read of every file).
    runs: list[tuple[Any, list[str]]] = []
    for path in files:
        schema = pq.read_schema(path, filesystem=arrow_fs)
        if runs and runs[-1][0].equals(schema):
            runs[-1][1].append(path)
        else:
            runs.append((schema, [path]))
    unified = unify_schemas([schema for schema, _ in runs])
    scanned = (
        ds.dataset(paths, schema=schema, format="parquet", filesystem=arrow_fs).to_table(
            filter=where
        )
        for schema, paths in runs
    )
    return pa.concat_tables([conform(table, unified) for table in scanned])
