"""The one module that imports Evidently: its HTML report, and plain Evidently's verdicts and
tests, which the tests and the benchmark compare with ours.

Importing Evidently takes 6-15 s and about 200 MB, so the checks themselves never do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

from stagegate.monitoring.results import INSUFFICIENT, DriftReport, Kind


@dataclass(frozen=True)
class EvidentlyColumn:
    """One `ValueDrift` of a plain Evidently report; `test` uses our (and Evidently's) names."""

    column: str
    test: str
    threshold: float
    score: float
    drifted: bool


@dataclass(frozen=True)
class EvidentlyDrift:
    columns: dict[str, EvidentlyColumn]
    drifted_share: float
    drift_share: float


@contextmanager
def _quiet() -> Iterator[None]:
    """Evidently and plotly warn about their own deprecations and pandas idioms."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            yield


def _test_names() -> dict[str, str]:
    from evidently.legacy.calculations import stattests

    tests = (
        stattests.wasserstein_stat_test,
        stattests.jensenshannon_stat_test,
        stattests.ks_stat_test,
        stattests.chi_stat_test,
        stattests.z_stat_test,
    )
    return {t.display_name: t.name for t in tests}


def _definition(kinds: Mapping[str, Kind]) -> Any:
    from evidently import DataDefinition

    return DataDefinition(
        numerical_columns=[c for c, k in kinds.items() if k == "numerical"],
        categorical_columns=[c for c, k in kinds.items() if k == "categorical"],
    )


def _datasets(reference: pa.Table, current: pa.Table, kinds: Mapping[str, Kind]) -> Any:
    from evidently import Dataset

    definition = _definition(kinds)

    def frame(table: pa.Table) -> Any:
        return table.select([c for c in kinds if c in table.column_names]).to_pandas()

    return (
        Dataset.from_pandas(frame(reference), data_definition=definition),
        Dataset.from_pandas(frame(current), data_definition=definition),
    )


def _report(
    reference: pa.Table, current: pa.Table, kinds: Mapping[str, Kind], drift_share: float
) -> Any:
    from evidently import Report
    from evidently.presets import DataDriftPreset

    ref, cur = _datasets(reference, current, kinds)
    report = Report([DataDriftPreset(drift_share=drift_share)], include_tests=True)
    return report.run(current_data=cur, reference_data=ref)


def evidently_drift(
    reference: pa.Table, current: pa.Table, kinds: Mapping[str, Kind], drift_share: float = 0.5
) -> EvidentlyDrift:
    """Plain Evidently: `Report([DataDriftPreset()])` with an explicit data definition.

    Raises whatever Evidently raises (an all-NaN or missing column fails the whole report).
    """
    with _quiet():
        summary = _report(reference, current, kinds, drift_share).dict()
        names = _test_names()
    drifted = {
        t["metric_config"]["params"]["column"]: t["status"] == "FAIL"
        for t in summary["tests"]
        if t["metric_config"]["params"].get("type") == "evidently:metric_v2:ValueDrift"
    }
    columns: dict[str, EvidentlyColumn] = {}
    share = 0.0
    for metric in summary["metrics"]:
        config = metric["config"]
        if config["type"] == "evidently:metric_v2:DriftedColumnsCount":
            share = float(metric["value"]["share"])
        elif config["type"] == "evidently:metric_v2:ValueDrift":
            column = config["column"]
            columns[column] = EvidentlyColumn(
                column,
                names.get(config["method"], config["method"]),
                float(config["threshold"]),
                float(metric["value"]),
                drifted[column],
            )
    return EvidentlyDrift(columns, share, drift_share)


def evidently_stattest(
    reference: np.ndarray[Any, Any],
    current: np.ndarray[Any, Any],
    kind: Kind,
    test: str | None = None,
    threshold: float | None = None,
) -> tuple[str, float, bool]:
    """Evidently's own test function on two samples: (test name, score, drifted). With
    `test=None`, Evidently picks the test as its preset would."""
    import pandas as pd

    ref, cur = pd.Series(reference).dropna(), pd.Series(current).dropna()
    with _quiet():
        from evidently.legacy.calculations.stattests.registry import get_stattest
        from evidently.legacy.core import ColumnType

        column_type = ColumnType.Numerical if kind == "numerical" else ColumnType.Categorical
        stattest = get_stattest(ref, cur, column_type, test)
        result = stattest(ref, cur, column_type, threshold)
    return stattest.name, float(result.drift_score), bool(result.drifted)


def _sample(table: pa.Table, rows: int, seed: int) -> pa.Table:
    if table.num_rows <= rows:
        return table
    picked = np.sort(np.random.default_rng(seed).choice(table.num_rows, rows, replace=False))
    return table.take(pa.array(picked))


def render_html(
    reference: pa.Table,
    current: pa.Table,
    report: DriftReport,
    sample_rows: int = 50_000,
    seed: int = 0,
) -> str:
    """Evidently's drift report as a standalone HTML page, on a seeded sample of at most
    `sample_rows` rows per window, for the columns our check could test (Evidently fails the
    whole report on an all-NaN or missing column). The verdicts of record are the report's:
    a sample can differ from the full window near a threshold."""
    kinds: dict[str, Kind] = {
        c.column: c.kind
        for c in (*report.columns, *([report.prediction] if report.prediction else []))
        if c.verdict != INSUFFICIENT and c.kind is not None
    }
    if not kinds:
        raise ValueError("no column has enough data for a report")
    ref = _sample(reference.select(list(kinds)), sample_rows, seed)
    cur = _sample(current.select(list(kinds)), sample_rows, seed + 1)
    with _quiet():
        snapshot = _report(ref, cur, kinds, report.dataset.drift_share)
        html: str = snapshot.get_html_str(as_iframe=False)
    return html
