"""Request bodies and answers decoded into feature and prediction columns, for `features.py`.

Pure functions, no I/O: the writer's background thread calls them, never the request path.
Read as the model server reads a body (the same media types and JSON formats), but from the
data alone: the model's signature is not at hand, so a column's type is what its values say.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from operator import itemgetter
from typing import Any

import orjson
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pacsv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from stagegate.serving.inference_log.format import dumps

# The media types the model server accepts (`serving/model_server/scoring.py`, which this
# package may not import; a test holds the two lists equal). The router sends JSON when the
# client named no content type.
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_CSV = "text/csv"
CONTENT_TYPE_PARQUET = "application/vnd.apache.parquet"
CONTENT_TYPES = (CONTENT_TYPE_CSV, CONTENT_TYPE_JSON, CONTENT_TYPE_PARQUET)

# mlflow's JSON formats: exactly one of these keys (beside an optional "params").
_FORMAT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")

# The work one request may cost the writer. A request over MAX_ROWS rows keeps every k-th row
# (k = ceil(rows / MAX_ROWS), so at most MAX_ROWS, spread evenly; `row` keeps the original
# index); one over MAX_COLUMNS feature columns gives no rows and counts as undecodable.
MAX_ROWS = 10_000
MAX_COLUMNS = 1_000

# The names `features.py` keeps for itself; a feature of one of these names is stored as
# `input.<name>`.
META_COLUMNS = ("request_id", "version", "role", "at", "row")
PREDICTION = "prediction"
_RESERVED = frozenset({*META_COLUMNS, "model", "date", PREDICTION})

Columns = dict[str, Sequence[Any]]  # one sequence of values per column


class Undecodable(ValueError):
    """A body that is not one of the model server's formats (the reason is the message)."""


@dataclass(frozen=True, slots=True)
class Inputs:
    """One request's rows: Python rows (JSON bodies) or an Arrow table (CSV, Parquet).

    Rows, not columns, because most requests hold one row or a few: a request's rows are
    only referenced here, and a whole batch's rows are turned into columns at once."""

    count: int
    names: tuple[str, ...] = ()  # the stored names (`stored_names`) of the JSON columns
    rows: Sequence[Sequence[Any]] = ()  # JSON: one sequence of values per row, in `names` order
    table: Any = None  # CSV and Parquet: a pyarrow.Table of canonical columns, stored names


def media_type(content_type: str | None) -> str:
    """The media type of a Content-Type header, lower case, without parameters."""
    if content_type is None:
        return CONTENT_TYPE_JSON
    return content_type.partition(";")[0].strip().lower()


def decode_inputs(body: bytes | None, content_type: str | None, document: Any = None) -> Inputs:
    """The rows of one request; raise Undecodable with the reason.

    `document` is the JSON body already parsed (the router's `inputs`), which saves a parse.
    """
    kind = media_type(content_type)
    if kind == CONTENT_TYPE_JSON:
        if document is None:
            if body is None:
                raise Undecodable("no body")
            document = _json(body)
        return _from_document(document)
    if body is None:
        raise Undecodable("no body")
    if kind == CONTENT_TYPE_CSV:
        return _from_csv(body)
    if kind == CONTENT_TYPE_PARQUET:
        return _from_parquet(body)
    raise Undecodable(f"content type {content_type!r} is not one the model server reads")


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:  # as the model server: the stdlib reads NaN, Infinity and huge integers
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise Undecodable(f"not JSON: {exc}") from None


# -- JSON: mlflow's four formats ------------------------------------------------------------


def _from_document(document: Any) -> Inputs:
    if not isinstance(document, dict):
        raise Undecodable("the JSON body is not an object")
    key = next((k for k in _FORMAT_KEYS if k in document), None)
    if key is None:
        raise Undecodable(f"the JSON body has none of the keys {', '.join(_FORMAT_KEYS)}")
    value = document[key]
    if key == "dataframe_split":
        if not isinstance(value, dict):
            raise Undecodable("dataframe_split is not an object")
        return _from_rows(value.get("data"), value.get("columns"))
    if key == "dataframe_records":
        return _from_rows(value, None)
    # instances and inputs: mlflow's tensor input, a dict of columns or a list of rows
    if isinstance(value, dict):
        return _from_column_dict(value)
    return _from_rows(value, None)


def _from_rows(data: Any, columns: Any) -> Inputs:
    """A list of rows: objects (named fields), lists (positional), or scalars (one column)."""
    if not isinstance(data, list):
        raise Undecodable("the rows are not a list")
    if not data:
        return Inputs(0)
    # The checks map over the rows in C: per-row Python is what a decoder spends its time on.
    kinds = set(map(type, data))
    if kinds == {dict} and columns is None:
        return _from_records(data)
    if kinds == {list}:
        widths = set(map(len, data))
        if len(widths) != 1:
            raise Undecodable("the rows are not lists of one length")
        width = widths.pop()
        if columns is None:
            names = stored_names(range(width))
        elif isinstance(columns, list) and len(columns) == width:
            names = stored_names(columns)
        else:
            raise Undecodable("the columns do not match the rows")
        return Inputs(len(data), names, data)
    if columns is not None or kinds & {dict, list}:
        raise Undecodable("the rows mix shapes")
    return Inputs(len(data), stored_names((0,)), list(zip(data)))


def _from_records(records: list[dict[Any, Any]]) -> Inputs:
    keys = list(records[0])
    if not keys:
        return Inputs(len(records), (), [()] * len(records))
    if set(map(len, records)) == {len(keys)}:
        get = itemgetter(*keys) if len(keys) > 1 else lambda r: (r[keys[0]],)
        try:  # all of one length and none lacks a key: all have the same keys
            return Inputs(len(records), stored_names(keys), list(map(get, records)))
        except KeyError:
            pass
    seen = list(dict.fromkeys(k for r in records for k in r))  # every key, first-seen order
    rows = [tuple(r.get(k) for k in seen) for r in records]
    return Inputs(len(records), stored_names(seen), rows)


def _from_column_dict(columns: dict[Any, Any]) -> Inputs:
    names = stored_names(list(columns))
    values = list(columns.values())
    kinds = set(map(type, values))
    if kinds == {list}:
        lengths = set(map(len, values))
        if len(lengths) != 1:
            raise Undecodable("the columns differ in length")
        return Inputs(lengths.pop(), names, list(zip(*values, strict=True)))
    if not kinds & {list, dict}:
        return Inputs(1, names, [values])  # one row given as scalars
    raise Undecodable("the columns mix lists and scalars")


def _name(key: Any) -> str:
    return key if isinstance(key, str) else dumps(key)


# -- CSV and Parquet --------------------------------------------------------------------------

# pandas' reading, as the model server's (mlflow's parse_csv_input): empty and NA-like fields
# are null in every column, and dates stay text.
_CSV_CONVERT = pacsv.ConvertOptions(strings_can_be_null=True)


def _from_csv(body: bytes) -> Inputs:
    try:
        table = pacsv.read_csv(BytesIO(body), convert_options=_CSV_CONVERT)
        temporal = [f.name for f in table.schema if _is_temporal(f.type)]
        if temporal:  # read again with those columns as text, as written
            options = pacsv.ConvertOptions(
                strings_can_be_null=True, column_types=dict.fromkeys(temporal, pa.string())
            )
            table = pacsv.read_csv(BytesIO(body), convert_options=options)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise Undecodable(f"not CSV: {exc}") from None
    if any(pa.types.is_binary(f.type) for f in table.schema):  # what pyarrow makes of it
        raise Undecodable("the CSV is not UTF-8")  # and the model server refuses it
    return _from_table(table)


def _from_parquet(body: bytes) -> Inputs:
    try:
        table = pq.read_table(BytesIO(body))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise Undecodable(f"not Parquet: {exc}") from None
    # A frame written by pandas keeps its index in columns its metadata names; mlflow reads
    # the body with pandas, which makes them the index again, not features.
    pandas = table.schema.pandas_metadata or {}
    index = {c for c in pandas.get("index_columns", []) if isinstance(c, str)}
    return _from_table(table.select([n for n in table.column_names if n not in index]))


def _from_table(table: Any) -> Inputs:
    names = stored_names(table.column_names)
    arrays = [canonical(table.column(i)) for i in range(table.num_columns)]
    return Inputs(table.num_rows, table=pa.Table.from_arrays(arrays, names=list(names)))


# -- column types ------------------------------------------------------------------------------


def _is_temporal(kind: Any) -> bool:
    return bool(pa.types.is_temporal(kind))


def _canonical_type(kind: Any) -> Any:
    """The feature type a column of Arrow type `kind` is stored as; None: JSON text."""
    if pa.types.is_null(kind) or pa.types.is_boolean(kind) or pa.types.is_string(kind):
        return kind
    if pa.types.is_integer(kind):
        return pa.int64()
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return pa.float64()
    return None if pa.types.is_nested(kind) else pa.string()


def canonical(values: Any) -> Any:
    """An Arrow array of one of the feature types: null, bool, int64, float64 or string.

    Any integer becomes int64 (a uint64 too large for it: float64), any float or decimal
    float64, dictionaries their values, anything else text: nested values as JSON, others as
    Arrow casts them (a date: `2026-03-01`)."""
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    target = _canonical_type(values.type)
    if target is not None and values.type == target:
        return values
    if target is not None:
        try:  # a lossy cast only to float64, where rounding is the point
            return values.cast(target, safe=target != pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            if target == pa.int64():
                return values.cast(pa.float64(), safe=False)
    return pa.array([None if v is None else dumps(v) for v in values.to_pylist()], pa.string())


def column_array(values: Sequence[Any]) -> Any:
    """Python values (one column of a JSON body) as a canonical Arrow array.

    Values of one JSON type keep it (integers and floats together: float64); a column that
    mixes types, or holds integers beyond int64, is text (JSON for anything not a string)."""
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([v if v is None or type(v) is str else dumps(v) for v in values])
    return canonical(array)


# -- predictions -------------------------------------------------------------------------------


def prediction_columns(output: Any, rows: int) -> Columns | None:
    """One prediction per input row, as columns; None when `output` is not one per row.

    A scalar per row is `prediction`; an object per row (or an object of columns) is
    `prediction.<key>`; a list per row (class probabilities) is `prediction.<index>`."""
    if isinstance(output, dict):
        return _prediction_dict(output, rows)
    if isinstance(output, list):
        return _prediction_list(output) if len(output) == rows else None
    return None if output is None or rows != 1 else {PREDICTION: [output]}


def _prediction_dict(output: dict[Any, Any], rows: int) -> Columns | None:
    values = list(output.values())
    if set(map(type, values)) <= {list} and set(map(len, values)) <= {rows}:
        return {f"{PREDICTION}.{_name(k)}": v for k, v in output.items()}
    if rows == 1 and not set(map(type, values)) & {list, dict}:
        return {f"{PREDICTION}.{_name(k)}": [v] for k, v in output.items()}
    return None


def _prediction_list(output: list[Any]) -> Columns:
    """Columns of an object or a list per row; one `prediction` column otherwise, and also
    when that would be over MAX_COLUMNS columns (each row's value then JSON text)."""
    kinds = set(map(type, output))
    if kinds == {dict}:
        keys = dict.fromkeys(k for p in output for k in p)
        if len(keys) <= MAX_COLUMNS:
            return {f"{PREDICTION}.{_name(k)}": [p.get(k) for p in output] for k in keys}
    elif kinds == {list}:
        width = max(map(len, output))
        if width <= MAX_COLUMNS:
            return {
                f"{PREDICTION}.{i}": [p[i] if i < len(p) else None for p in output]
                for i in range(width)
            }
    return {PREDICTION: output}


# -- names and sampling --------------------------------------------------------------------


def stored_names(keys: Sequence[Any]) -> tuple[str, ...]:
    """The stored names of a request's columns, checked; raise Undecodable.

    A non-string name is its JSON text (`0`); a feature named like a column of the features
    table (or `prediction`, `prediction.*`, `model`, `date`) gets an `input.` prefix, more
    than one if that one is taken. Cached: a model's requests mostly name the same columns.
    """
    key = tuple(keys)
    try:
        hit = _NAMES.get(key)
    except TypeError:  # an unhashable name: a list given as a column name
        return _stored_names(tuple(map(_name, key)))
    # Names that are all strings match only strings; others (1 == 1.0 == True) need their
    # types checked too.
    if hit is not None and (hit[1] is None or hit[1] == tuple(map(type, key))):
        return hit[0]
    names = _stored_names(key)
    if len(_NAMES) >= _NAMES_CACHED:
        _NAMES.clear()
    types = tuple(map(type, key))
    _NAMES[key] = (names, None if set(types) <= {str} else types)
    return names


_NAMES_CACHED = 1024
_NAMES: dict[tuple[Any, ...], tuple[tuple[str, ...], tuple[type, ...] | None]] = {}


def _stored_names(keys: tuple[Any, ...]) -> tuple[str, ...]:
    if len(keys) > MAX_COLUMNS:
        raise Undecodable(f"{len(keys)} columns; at most {MAX_COLUMNS} are decoded")
    names = [_name(k) for k in keys]
    taken = set(names)
    if len(taken) != len(names):
        raise Undecodable("duplicate column names")
    out = []
    for name in names:
        stored = name
        while (
            stored in _RESERVED
            or stored.startswith(PREDICTION + ".")
            or (stored != name and stored in taken)
        ):
            stored = "input." + stored
        out.append(stored)
    return tuple(out)


def sample(rows: int) -> int:
    """The step that keeps every k-th row of a request over MAX_ROWS rows (at most MAX_ROWS of
    them, spread evenly); 1 keeps all."""
    return 1 if rows <= MAX_ROWS else -(-rows // MAX_ROWS)
