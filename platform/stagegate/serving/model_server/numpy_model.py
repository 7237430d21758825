"""The fast path: JSON rows straight into a numpy array in signature order, one estimator call.

pyfunc's DataFrame building and schema enforcement cost ~1.5 ms a request; this costs a few µs.
It only takes requests it can read exactly as pyfunc would. Anything else (CSV, an unusual
shape, a value that is not a plain number) goes to the generic pyfunc scorer, so the answers
stay pyfunc's answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, Literal

import numpy as np

from stagegate.serving.model_server.scoring import (
    CONTENT_TYPE_JSON,
    DocumentScorer,
    Parsed,
    ScoringError,
    bad_request,
    decode_json,
    encode_array_predictions,
    json_type_name,
    predict_failed,
)

logger = logging.getLogger(__name__)

ColumnType = Literal["double", "long"]
ArrayPredict = Callable[[np.ndarray[Any, Any]], Any]

FAST_GROUP = "numpy"  # the Parsed.group of fast-path requests: all of them can share a call
_RECORD_KEYS = ("dataframe_records", "instances", "inputs")
_SPLIT_KEYS = frozenset({"columns", "data"})
_NoneType = type(None)


class NumpyScorer:
    """Scores a model whose pyfunc predict is `estimator.<fn>(DataFrame)` on numeric columns."""

    def __init__(
        self,
        columns: Sequence[tuple[str, ColumnType]],
        predict: ArrayPredict,
        fallback: DocumentScorer,
        *,
        allow_nan: bool,
    ) -> None:
        self.names = [name for name, _ in columns]
        self._types = [kind for _, kind in columns]
        self._predict = predict
        self._fallback = fallback
        self._allow_nan = allow_nan
        self._long_columns = [i for i, kind in enumerate(self._types) if kind == "long"]
        all_long = len(self._long_columns) == len(self._types)
        # pyfunc hands sklearn int64 columns for `long` and float64 for `double`; a mixed frame
        # becomes float64 inside sklearn, so building float64 here feeds it the same numbers.
        self._dtype = np.int64 if all_long else np.float64
        self._plain_types: set[type] = {int} if all_long else {int, float, _NoneType}

    # -- parsing (event loop, or a helper thread for big bodies) --------------------------

    def parse(self, body: bytes, media_type: str) -> Parsed:
        if media_type != CONTENT_TYPE_JSON:
            return self._fallback.parse(body, media_type)
        return self.parse_document(decode_json(body))

    def parse_document(self, document: Any) -> Parsed:
        rows = self._rows(document)
        if rows is None:
            return self._fallback.parse_document(document)
        array = self._array(rows)
        if array is not None:
            return Parsed(len(rows), FAST_GROUP, array)
        # Values that are not plain numbers: mlflow accepts some ("1.5", true), so let its
        # parser decide, and when it refuses, say which column is wrong.
        try:
            return self._fallback.parse_document(document)
        except ScoringError:
            raise self._type_error(rows) from None

    def _rows(self, document: Any) -> list[Any] | None:
        """The rows in signature order, or None for a shape this path does not read."""
        if type(document) is not dict or len(document) != 1:
            return None
        ((key, value),) = document.items()
        if key == "dataframe_split":
            return self._split_rows(value)
        if key in _RECORD_KEYS and type(value) is list:
            return self._record_rows(value)
        if key == "inputs" and type(value) is dict:
            return self._column_rows(value)
        return None

    def _split_rows(self, split: Any) -> list[Any] | None:
        if type(split) is not dict or split.keys() != _SPLIT_KEYS:
            return None  # no columns, or an index: pyfunc's own reading applies
        columns, data = split["columns"], split["data"]
        if type(columns) is not list or type(data) is not list or not data:
            return None
        width = len(columns)
        if not all(type(row) is list and len(row) == width for row in data):
            raise bad_request(
                f"Invalid input. Every row of dataframe_split.data must be a list of {width} "
                "values, one per column."
            )
        if columns == self.names:
            return data
        if not all(type(c) is str for c in columns) or len(set(columns)) != width:
            return None
        given = {name: i for i, name in enumerate(columns)}
        missing = [name for name in self.names if name not in given]
        if missing:
            raise self._missing(missing)
        picks = [given[name] for name in self.names]  # reorder; extra columns are ignored
        return [[row[i] for i in picks] for row in data]

    def _record_rows(self, records: list[Any]) -> list[Any] | None:
        if not records or not all(type(record) is dict for record in records):
            return None
        names = self.names
        try:
            return [[record[name] for name in names] for record in records]
        except KeyError:
            for i, record in enumerate(records):
                if missing := [name for name in names if name not in record]:
                    raise self._missing(missing, f" in record {i}") from None
            raise

    def _column_rows(self, columns: dict[str, Any]) -> list[Any] | None:
        if missing := [name for name in self.names if name not in columns]:
            raise self._missing(missing)
        values = [columns[name] for name in self.names]
        if all(type(v) is list for v in values):
            lengths = {len(v) for v in values}
            if len(lengths) != 1 or not values[0]:
                raise bad_request(
                    "Invalid input. The length of values for each input/column name are not "
                    "the same"
                )
            return [list(row) for row in zip(*values, strict=True)]
        if not any(type(v) in (list, dict) for v in values):
            return [values]  # one row given as scalars
        return None

    def _array(self, rows: list[Any]) -> np.ndarray[Any, Any] | None:
        """The rows as a 2-D array, or None when a value needs pyfunc's lenient reading."""
        if not set(map(type, chain.from_iterable(rows))) <= self._plain_types:
            return None
        try:
            array = np.array(rows, dtype=self._dtype)
        except (OverflowError, ValueError, TypeError):
            return None
        if array.dtype.kind != "f":
            return array
        finite = np.isfinite(array)
        if finite.all():
            return array if not self._long_columns else self._checked_longs(array)
        if self._long_columns and not finite[:, self._long_columns].all():
            return None  # a null in a long column: pyfunc refuses it, with its own words
        if np.isinf(array).any():
            raise self._value_error(np.isinf(array), "an infinite value")
        if not self._allow_nan:
            raise self._value_error(
                np.isnan(array), "a null value, and this model does not accept missing values"
            )
        return array if not self._long_columns else self._checked_longs(array)

    def _checked_longs(self, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
        longs = array[:, self._long_columns]
        return array if bool((longs == np.trunc(longs)).all()) else None

    # -- errors -----------------------------------------------------------------------------

    def _missing(self, missing: list[str], where: str = "") -> ScoringError:
        listed = ", ".join(f"'{name}'" for name in missing)
        noun = "column" if len(missing) == 1 else "columns"
        return bad_request(
            f"Invalid input. Missing {noun} {listed}{where}, in the model signature."
        )

    def _type_error(self, rows: list[Any]) -> ScoringError:
        for i, row in enumerate(rows):
            for name, kind, value in zip(self.names, self._types, row, strict=True):
                if not _is_plain(value, kind):
                    return bad_request(
                        f"Invalid input: column '{name}' expects {kind} values, but row {i} has "
                        f"{json_type_name(value)} {_short(value)}."
                    )
        return bad_request("Invalid input. The values do not match the model signature.")

    def _value_error(self, bad: np.ndarray[Any, Any], what: str) -> ScoringError:
        row, col = (int(i) for i in np.argwhere(bad)[0])
        return bad_request(f"Invalid input: column '{self.names[col]}' has {what} (row {row}).")

    # -- predicting (predict thread) --------------------------------------------------------

    def predict(self, batch: Sequence[Parsed]) -> list[bytes | ScoringError]:
        results: list[bytes | ScoringError | None] = [None] * len(batch)
        fast = [i for i, item in enumerate(batch) if item.group == FAST_GROUP]
        if len(fast) < len(batch):
            others = [i for i, item in enumerate(batch) if item.group != FAST_GROUP]
            for i, result in zip(
                others, self._fallback.predict([batch[i] for i in others]), strict=True
            ):
                results[i] = result
        if fast:
            for i, result in zip(fast, self._predict_arrays([batch[i] for i in fast]), strict=True):
                results[i] = result
        return [r if r is not None else predict_failed() for r in results]

    def _predict_arrays(self, items: list[Parsed]) -> list[bytes | ScoringError]:
        arrays = [item.data for item in items]
        merged = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        try:
            output = self._call(merged)
        except Exception:
            if len(items) == 1:
                logger.exception("predict failed on %d row(s)", merged.shape[0])
                return [predict_failed()]
            # One bad request must not fail its batch-mates: predict each on its own.
            return [self._predict_arrays([item])[0] for item in items]
        bodies: list[bytes | ScoringError] = []
        start = 0
        for item in items:
            bodies.append(self._encode(output[start : start + item.rows]))
            start += item.rows
        return bodies

    def _encode(self, predictions: np.ndarray[Any, Any]) -> bytes:
        return encode_array_predictions(predictions)

    def _call(self, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        output = self._predict(array)
        if not isinstance(output, np.ndarray) or output.shape[:1] != array.shape[:1]:
            raise TypeError(f"expected one prediction per row, got {type(output).__name__}")
        return output


def _is_plain(value: Any, kind: ColumnType) -> bool:
    if kind == "long":
        return type(value) is int
    return type(value) in (int, float, _NoneType)  # null reads as NaN, as in pandas


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
