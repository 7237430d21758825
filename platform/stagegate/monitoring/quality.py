"""Data quality against the reference (missing values, unseen categories, out-of-range
numbers) and model performance on labelled rows."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]

from stagegate.monitoring.columns import CategoricalColumn, NumericColumn
from stagegate.monitoring.drift import Counts
from stagegate.monitoring.results import ColumnQuality, Kind, Performance

UNSEEN_LISTED = 20  # the most frequent unseen categories named in the result


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def missing_only(column: str, kind: Kind | None) -> ColumnQuality:
    """A column absent from a window: nothing to measure."""
    return ColumnQuality(column, kind, None, None)


def numeric_quality(column: str, reference: NumericColumn, current: NumericColumn) -> ColumnQuality:
    """Missing shares, and the share of current values below the reference's min or above its
    max (both arrays are sorted, so this is two binary searches)."""
    low = high = out = None
    if len(reference.values) and len(current.values):
        low, high = float(reference.values[0]), float(reference.values[-1])
        below = int(np.searchsorted(current.values, low, side="left"))
        above = len(current.values) - int(np.searchsorted(current.values, high, side="right"))
        out = (below + above) / len(current.values)
    return ColumnQuality(
        column,
        "numerical",
        _share(reference.missing, reference.total),
        _share(current.missing, current.total),
        out_of_range_share=out,
        reference_min=low,
        reference_max=high,
    )


def categorical_quality(
    column: str, reference: CategoricalColumn, current: CategoricalColumn, unseen: Counts
) -> ColumnQuality:
    """Missing shares, and the categories of the current window the reference never had."""
    unseen_counts = current.counts[unseen]
    top = unseen[np.argsort(-unseen_counts, kind="stable")[:UNSEEN_LISTED]]
    names = tuple(str(v) for v in current.values.take(pa.array(top, pa.int64())).to_pylist())
    return ColumnQuality(
        column,
        "categorical",
        _share(reference.missing, reference.total),
        _share(current.missing, current.total),
        unseen_categories=names,
        unseen_category_count=len(unseen),
        unseen_share=_share(int(unseen_counts.sum()), current.present),
    )


def _labelled(table: pa.Table, prediction: str, label: str) -> tuple[pa.Array, pa.Array]:
    pred = table.column(prediction).combine_chunks()
    truth = table.column(label).combine_chunks()
    keep = pc.and_(pc.is_valid(pred), pc.is_valid(truth))
    for arr in (pred, truth):
        if pa.types.is_floating(arr.type):
            keep = pc.and_(keep, pc.is_finite(arr))
    keep = pc.fill_null(keep, False)
    return pred.filter(keep), truth.filter(keep)


def _metric(pred: pa.Array, truth: pa.Array, kind: Kind) -> float:
    if kind == "categorical":
        if truth.type != pred.type:
            truth = pc.cast(truth, pred.type)
        return float(pc.mean(pc.cast(pc.equal(pred, truth), pa.float64())).as_py())
    gap = np.subtract(
        np.asarray(pred.to_numpy(zero_copy_only=False), dtype=np.float64),
        np.asarray(truth.to_numpy(zero_copy_only=False), dtype=np.float64),
    )
    return float(np.abs(gap).mean())


def performance(
    reference: pa.Table,
    current: pa.Table,
    prediction: str,
    label: str,
    kind: Kind,
    min_rows: int,
) -> Performance:
    """Accuracy for a categorical prediction, MAE for a numerical one, on the rows of each
    window that hold both a prediction and a label (labels arrive late, so most may not)."""
    metric: Literal["accuracy", "mae"] = "accuracy" if kind == "categorical" else "mae"
    values: list[float | None] = []
    rows: list[int] = []
    for table in (reference, current):
        if prediction not in table.column_names or label not in table.column_names:
            values.append(None)
            rows.append(0)
            continue
        pred, truth = _labelled(table, prediction, label)
        rows.append(len(pred))
        values.append(_metric(pred, truth, kind) if len(pred) >= min_rows else None)
    if min(rows) < min_rows:
        return Performance(
            metric,
            values[0],
            values[1],
            rows[0],
            rows[1],
            "insufficient data",
            f"{min(rows)} labelled rows, fewer than min_rows={min_rows}",
        )
    return Performance(metric, values[0], values[1], rows[0], rows[1], "ok")
