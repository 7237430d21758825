"""`check()`: one drift check of a current window against the reference, column by column.

Each column is read from the Arrow tables, tested and dropped before the next one, so memory
stays near the two tables plus a few copies of one column.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

from stagegate.lifecycle.policy import DriftCriteria
from stagegate.monitoring import columns as cols
from stagegate.monitoring import drift, quality
from stagegate.monitoring.results import (
    DRIFT,
    INSUFFICIENT,
    OK,
    ColumnDrift,
    ColumnQuality,
    DatasetDrift,
    DriftReport,
    Kind,
)

SIMPLE_BINS = 20  # Evidently bins a numerical Jensen-Shannon only above 20 reference values


def feature_columns(reference: pa.Table, criteria: DriftCriteria) -> list[str]:
    """The columns checked for data drift: the policy's list, or every reference column but the
    excluded ones, the prediction and the label."""
    if criteria.columns is not None:
        return list(criteria.columns)
    skip = {*criteria.exclude_columns, criteria.prediction_column, criteria.label_column}
    return [c for c in reference.column_names if c not in skip]


def _insufficient(
    name: str, kind: Kind | None, reason: str, ref_rows: int = 0, cur_rows: int = 0
) -> ColumnDrift:
    return ColumnDrift(
        name, kind, None, None, None, False, INSUFFICIENT, ref_rows, cur_rows, reason
    )


def _verdict(
    name: str,
    kind: Kind,
    test: drift.Test,
    threshold: float | None,
    score: float,
    ref_rows: int,
    cur_rows: int,
) -> ColumnDrift:
    limit = drift.DEFAULT_THRESHOLD[test] if threshold is None else threshold
    drifted = drift.is_drift(test, score, limit)
    return ColumnDrift(
        name, kind, test, limit, score, drifted, DRIFT if drifted else OK, ref_rows, cur_rows
    )


def _too_few(name: str, kind: Kind, ref_rows: int, cur_rows: int, min_rows: int) -> str | None:
    for window, rows in (("reference", ref_rows), ("current", cur_rows)):
        if rows < min_rows:
            what = "no values" if rows == 0 else f"{rows} non-missing values"
            return f"{what} in the {window} window, fewer than min_rows={min_rows}"
    return None


def _numerical(
    name: str,
    reference: pa.ChunkedArray,
    current: pa.ChunkedArray,
    criteria: DriftCriteria,
) -> tuple[ColumnDrift, ColumnQuality]:
    ref = cols.numeric(reference)
    cur = cols.numeric(current)
    found = quality.numeric_quality(name, ref, cur)
    n, m = len(ref.values), len(cur.values)
    reason = _too_few(name, "numerical", n, m, criteria.min_rows)
    if reason:
        return _insufficient(name, "numerical", reason, n, m), found
    ref_distinct = drift.count_distinct_sorted(ref.values)
    counted: tuple[drift.Counts, drift.Counts] | None = None
    if ref_distinct > drift.FEW_VALUES:
        distinct = ref_distinct
    else:
        ref_keys, ref_counts = drift.distinct_sorted(ref.values)
        cur_keys, cur_counts = drift.distinct_sorted(cur.values)
        counted = drift.aligned_counts(ref_keys, ref_counts, cur_keys, cur_counts)
        distinct = len(counted[0])
    if distinct < 2:
        reason = "a single value in both windows: no distribution to compare"
        return _insufficient(name, "numerical", reason, n, m), found
    test: drift.Test = (
        drift.auto_test("numerical", n, distinct)
        if criteria.numerical_test == "auto"
        else criteria.numerical_test
    )
    if test == "wasserstein":
        score = drift.wasserstein_normed(ref.values, cur.values)
    elif test == "ks":
        score = drift.ks_pvalue(ref.values, cur.values)
    else:
        if counted is None:
            if ref_distinct > SIMPLE_BINS and test == "jensenshannon":
                counted = drift.sturges_counts(ref.values, cur.values)
            else:
                ref_keys, ref_counts = drift.distinct_sorted(ref.values)
                cur_keys, cur_counts = drift.distinct_sorted(cur.values)
                counted = drift.aligned_counts(ref_keys, ref_counts, cur_keys, cur_counts)
        score = _counted_score(test, *counted)
    return _verdict(name, "numerical", test, criteria.numerical_threshold, score, n, m), found


def _counted_score(test: drift.Test, ref: drift.Counts, cur: drift.Counts) -> float:
    if test == "jensenshannon":
        return drift.jensenshannon(ref, cur)
    if test == "chisquare":
        return drift.chisquare_pvalue(ref, cur)
    return drift.z_pvalue(ref, cur)


def _categorical(
    name: str,
    reference: pa.ChunkedArray,
    current: pa.ChunkedArray,
    criteria: DriftCriteria,
) -> tuple[ColumnDrift, ColumnQuality]:
    ref = cols.categorical(reference)
    cur = cols.categorical(current)
    try:
        ref_counts, cur_counts, unseen = cols.align(ref, cur)
    except cols.ColumnTypeError as exc:
        missing = quality.missing_only(name, "categorical")
        return _insufficient(name, "categorical", str(exc), ref.present, cur.present), missing
    found = quality.categorical_quality(name, ref, cur, unseen)
    n, m = ref.present, cur.present
    reason = _too_few(name, "categorical", n, m, criteria.min_rows)
    if reason:
        return _insufficient(name, "categorical", reason, n, m), found
    distinct = len(ref_counts)
    if distinct < 2:
        reason = "a single category in both windows: no distribution to compare"
        return _insufficient(name, "categorical", reason, n, m), found
    test: drift.Test = (
        drift.auto_test("categorical", n, distinct)
        if criteria.categorical_test == "auto"
        else criteria.categorical_test
    )
    if test == "z" and distinct > 2:  # Evidently tests the smallest key against the rest
        keys = pa.concat_arrays([ref.values, cur.values.take(pa.array(unseen, pa.int64()))])
        first = min(range(distinct), key=lambda i: keys[i].as_py())
        order = np.r_[first, np.delete(np.arange(distinct), first)]
        ref_counts, cur_counts = ref_counts[order], cur_counts[order]
    score = _counted_score(test, ref_counts, cur_counts)
    return _verdict(name, "categorical", test, criteria.categorical_threshold, score, n, m), found


def check_column(
    name: str,
    reference: pa.Table,
    current: pa.Table,
    criteria: DriftCriteria,
    kind: Kind | None = None,
) -> tuple[ColumnDrift | None, ColumnQuality, str | None]:
    """Drift and quality of one column; the drift is None (with a reason) for a type the
    monitor does not check."""
    for window, table in (("reference", reference), ("current", current)):
        if name not in table.column_names:
            reason = f"missing from the {window} window"
            return _insufficient(name, kind, reason), quality.missing_only(name, kind), None
    kind = kind or criteria.column_kinds.get(name) or cols.infer_kind(reference.column(name))
    if kind is None:
        skipped = f"type {reference.column(name).type} is not checked"
        return None, quality.missing_only(name, None), skipped
    check = _numerical if kind == "numerical" else _categorical
    try:
        return (*check(name, reference.column(name), current.column(name), criteria), None)
    except cols.ColumnTypeError as exc:
        return _insufficient(name, kind, str(exc)), quality.missing_only(name, kind), None


def check(
    reference: pa.Table,
    current: pa.Table,
    criteria: DriftCriteria,
    kinds: Mapping[str, Kind] | None = None,
) -> DriftReport:
    """Data drift per feature, prediction drift, data quality and performance, as Evidently's
    DataDriftPreset would judge them, with 'insufficient data' where it would crash or guess.

    `kinds` names columns numerical or categorical; the policy's `column_kinds` come next, and
    the Arrow type decides the rest (see `columns.infer_kind`).
    """
    kinds = dict(kinds or {})
    results: list[ColumnDrift] = []
    found: list[ColumnQuality] = []
    skipped: dict[str, str] = {}
    for name in feature_columns(reference, criteria):
        result, column_quality, why = check_column(
            name, reference, current, criteria, kinds.get(name)
        )
        found.append(column_quality)
        if result is None:
            skipped[name] = why or "not checked"
        else:
            results.append(result)

    prediction = None
    prediction_kind: Kind | None = None
    if criteria.prediction_column is not None:
        name = criteria.prediction_column
        prediction, _, why = check_column(name, reference, current, criteria, kinds.get(name))
        if prediction is None:
            skipped[name] = why or "not checked"
        else:
            prediction_kind = prediction.kind

    performance = None
    if criteria.prediction_column and criteria.label_column and prediction_kind is not None:
        performance = quality.performance(
            reference,
            current,
            criteria.prediction_column,
            criteria.label_column,
            prediction_kind,
            criteria.min_rows,
        )

    tested = [r for r in results if r.verdict != INSUFFICIENT]
    drifted = sum(r.drifted for r in tested)
    share = drifted / len(tested) if tested else None
    is_drift = share is not None and share >= criteria.drift_share
    dataset = DatasetDrift(
        len(tested),
        drifted,
        share,
        criteria.drift_share,
        is_drift,
        INSUFFICIENT if share is None else DRIFT if is_drift else OK,
    )
    return DriftReport(
        reference.num_rows,
        current.num_rows,
        dataset,
        tuple(results),
        tuple(found),
        prediction,
        performance,
        skipped,
    )
