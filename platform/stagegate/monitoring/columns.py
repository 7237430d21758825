"""One column of an Arrow table, made ready for the statistics without copying the table.

Numerical columns become sorted float64 arrays of their finite values (NaN, null and +-inf
count as missing, as Evidently drops them). Categorical columns become (values, counts) from
Arrow's hash-based `value_counts`; nulls and, for float columns, NaN count as missing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from stagegate.monitoring.drift import Counts, Floats
from stagegate.monitoring.results import Kind

INTEGER_CARDINALITY_LIMIT = 10  # Evidently: integers with at most 10 distinct values are categories


class ColumnTypeError(ValueError):
    """The column's Arrow type does not fit the kind asked for."""


@dataclass(frozen=True)
class NumericColumn:
    values: Floats  # finite values, sorted
    missing: int
    total: int


@dataclass(frozen=True)
class CategoricalColumn:
    values: pa.Array  # distinct non-missing values
    counts: Counts
    missing: int
    total: int

    @property
    def present(self) -> int:
        return self.total - self.missing


def infer_kind(column: pa.ChunkedArray) -> Kind | None:
    """Evidently's inference on Arrow types; None for types the monitor does not check."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "numerical"
    if pa.types.is_integer(kind):
        distinct = pc.count_distinct(column).as_py()
        return "categorical" if distinct <= INTEGER_CARDINALITY_LIMIT else "numerical"
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_string_view(kind)
        or pa.types.is_boolean(kind)
    ):
        return "categorical"
    return None


def _decoded(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return pc.cast(column, column.type.value_type)
    return column


def numeric(column: pa.ChunkedArray) -> NumericColumn:
    """Sorted finite float64 values; one copy of the column (the sort's)."""
    column = _decoded(column)
    if not (
        pa.types.is_floating(column.type)
        or pa.types.is_integer(column.type)
        or pa.types.is_decimal(column.type)
    ):
        raise ColumnTypeError(f"{column.type} is not numerical")
    total = len(column)
    if column.num_chunks == 0:
        return NumericColumn(np.zeros(0), 0, 0)
    if pa.types.is_floating(column.type) and column.null_count == 0 and column.num_chunks == 1:
        raw = column.chunk(0).to_numpy(zero_copy_only=False)  # a view for float64
    else:
        raw = column.to_numpy()
    values = np.asarray(raw, dtype=np.float64)
    finite = np.isfinite(values)
    present = int(np.count_nonzero(finite))
    if present < total:
        values = values[finite]
        values.sort()
    else:
        values = np.sort(values)
    del finite
    return NumericColumn(values, total - present, total)


def categorical(column: pa.ChunkedArray) -> CategoricalColumn:
    """Distinct non-missing values and their counts."""
    column = _decoded(column)
    total = len(column)
    if total == 0:
        return CategoricalColumn(pa.array([], type=column.type), np.zeros(0, np.int64), 0, 0)
    counted = pc.value_counts(column)
    values = counted.field("values")
    counts = counted.field("counts")
    keep = pc.is_valid(values)
    if pa.types.is_floating(values.type):
        keep = pc.and_(keep, pc.is_finite(values))
    values = values.filter(keep)
    counts = counts.filter(keep)
    kept = np.asarray(counts.to_numpy(zero_copy_only=False), dtype=np.int64)
    return CategoricalColumn(values, kept, total - int(kept.sum()), total)


def align(
    reference: CategoricalColumn, current: CategoricalColumn
) -> tuple[Counts, Counts, Counts]:
    """Counts of both windows over reference keys then unseen current keys, and the positions
    of the current values that the reference never had."""
    cur_values = current.values
    if cur_values.type != reference.values.type:
        try:
            cur_values = pc.cast(cur_values, reference.values.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ColumnTypeError(
                f"{current.values.type} cannot be compared with the reference's "
                f"{reference.values.type}"
            ) from exc
    where = pc.index_in(cur_values, value_set=reference.values)
    seen = np.asarray(pc.is_valid(where).to_numpy(zero_copy_only=False), dtype=bool)
    positions = np.asarray(where.filter(pc.is_valid(where)).to_numpy(zero_copy_only=False))
    unseen = np.flatnonzero(~seen)
    ref = np.concatenate((reference.counts, np.zeros(len(unseen), np.int64)))
    cur = np.zeros(len(reference.counts), np.int64)
    cur[positions.astype(np.int64)] = current.counts[seen]
    cur = np.concatenate((cur, current.counts[unseen]))
    return ref, cur, unseen
