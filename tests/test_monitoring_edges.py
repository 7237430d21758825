"""Too little data gives 'insufficient data', never a crash or an alarm. Each case first
records what plain Evidently (0.7.23, explicit data definition) does with the same data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stagegate.lifecycle.policy import DriftCriteria
from stagegate.monitoring.check import check
from stagegate.monitoring.evidently import evidently_drift, render_html
from stagegate.monitoring.results import Kind

KINDS: dict[str, Kind] = {"x": "numerical", "y": "numerical", "c": "categorical"}


def window(rows: int, seed: int, categories: str = "abcd") -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "x": pa.array(rng.normal(0, 1, rows)),
            "y": pa.array(rng.normal(0, 1, rows)),
            "c": pa.array(rng.choice(list(categories), rows)),
        }
    )


@pytest.fixture(scope="module")
def reference() -> pa.Table:
    return window(5000, seed=1)


def test_tiny_window(reference: pa.Table) -> None:
    current = window(5, seed=2)  # drawn from the reference's own distribution
    plain = evidently_drift(reference, current, KINDS)
    assert all(c.drifted for c in plain.columns.values())  # Evidently: 3 of 3 "drifted"
    report = check(reference, current, DriftCriteria())
    assert {c.verdict for c in report.columns} == {"insufficient data"}
    assert report.column("x").reason == (
        "5 non-missing values in the current window, fewer than min_rows=1000"
    )
    assert report.dataset.verdict == "insufficient data"
    assert not report.dataset.drifted


def test_empty_window(reference: pa.Table) -> None:
    current = reference.slice(0, 0)
    with pytest.raises(ValueError, match="empty column"):
        evidently_drift(reference, current, KINDS)
    report = check(reference, current, DriftCriteria())
    assert {c.verdict for c in report.columns} == {"insufficient data"}
    assert report.column("c").reason == (
        "no values in the current window, fewer than min_rows=1000"
    )
    assert report.quality[0].missing_share_current is None


def test_all_nan_column(reference: pa.Table) -> None:
    current = window(3000, seed=3).set_column(0, "x", pa.array(np.full(3000, np.nan)))
    with pytest.raises(ValueError, match="empty column 'x'"):
        evidently_drift(reference, current, KINDS)  # one column fails the whole report
    report = check(reference, current, DriftCriteria())
    assert report.column("x").verdict == "insufficient data"
    assert [c.verdict for c in report.columns[1:]] == ["ok", "ok"]  # the rest is still judged
    assert report.dataset.tested_columns == 2
    assert report.quality[0].missing_share_current == 1.0


def test_all_null_categorical_column(reference: pa.Table) -> None:
    current = window(3000, seed=4).set_column(2, "c", pa.nulls(3000, pa.string()))
    with pytest.raises(ValueError, match="empty column 'c'"):
        evidently_drift(reference, current, KINDS)
    report = check(reference, current, DriftCriteria())
    assert report.column("c").verdict == "insufficient data"
    assert report.quality[2].missing_share_current == 1.0


def test_single_category() -> None:
    reference = window(5000, seed=5, categories="a")
    current = window(3000, seed=6, categories="a")
    plain = evidently_drift(reference, current, KINDS)
    assert plain.columns["c"].score == 0.0  # Evidently scores a constant column, no error
    assert not plain.columns["c"].drifted
    report = check(reference, current, DriftCriteria())
    assert report.column("c").verdict == "insufficient data"
    assert "single category" in (report.column("c").reason or "")
    # A new category next to the single one is a real change, and is tested.
    changed = window(3000, seed=7, categories="ab")
    report = check(reference, changed, DriftCriteria())
    assert report.column("c").verdict == "drift"
    assert report.quality[2].unseen_categories == ("b",)


def test_missing_column(reference: pa.Table) -> None:
    current = window(3000, seed=8).drop_columns(["y"])
    with pytest.raises(ValueError, match="partially present"):
        evidently_drift(reference, current, KINDS)
    report = check(reference, current, DriftCriteria())
    assert report.column("y").verdict == "insufficient data"
    assert report.column("y").reason == "missing from the current window"
    assert report.dataset.tested_columns == 2


def test_column_of_another_type(reference: pa.Table) -> None:
    current = window(3000, seed=9).set_column(0, "x", pa.array(["1.5"] * 3000))
    report = check(reference, current, DriftCriteria())
    assert report.column("x").verdict == "insufficient data"
    assert report.column("x").reason == "string is not numerical"


def test_html_report_names_the_columns() -> None:
    rng = np.random.default_rng(11)

    def table(rows: int) -> pa.Table:
        return pa.table(
            {
                "basket_value": pa.array(rng.gamma(2.0, 30.0, rows)),
                "payment_method": pa.array(rng.choice(["card", "cash", "voucher"], rows)),
                "never_filled": pa.array(np.full(rows, np.nan)),
            }
        )

    reference, current = table(4000), table(3000)
    report = check(reference, current, DriftCriteria())
    html = render_html(reference, current, report, sample_rows=2000)
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert '"column_name": "basket_value"' in html
    assert '"column_name": "payment_method"' in html
    assert "never_filled" not in html  # insufficient data: left out, or Evidently would fail
