"""Known answers for `check()`: drift injected into known columns is found and the others are
left alone, the verdicts agree with plain Evidently's report, and the quality and performance
figures are the ones the data was built with."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from stagegate.lifecycle.policy import DriftCriteria, Policy, default_policy
from stagegate.monitoring.check import check
from stagegate.monitoring.columns import infer_kind
from stagegate.monitoring.evidently import evidently_drift

CATEGORIES = np.array(["red", "green", "blue", "black"])
P_REFERENCE = [0.4, 0.3, 0.2, 0.1]
P_DRIFTED = [0.1, 0.2, 0.3, 0.4]


def window(
    rows: int, seed: int, shifted: frozenset[str] = frozenset(), numeric: int = 6, cats: int = 3
) -> pa.Table:
    """Numerical columns n0.. (standard normal, +0.5 where shifted) and categorical c0..
    (P_REFERENCE, P_DRIFTED where shifted)."""
    rng = np.random.default_rng(seed)
    data: dict[str, pa.Array] = {}
    for i in range(numeric):
        name = f"n{i}"
        data[name] = pa.array(rng.normal(0.5 if name in shifted else 0.0, 1.0, rows))
    for i in range(cats):
        name = f"c{i}"
        p = P_DRIFTED if name in shifted else P_REFERENCE
        data[name] = pa.array(rng.choice(CATEGORIES, rows, p=p))
    return pa.table(data)


DRIFTED = frozenset({"n1", "n4", "c2"})


@pytest.fixture(scope="module")
def windows() -> tuple[pa.Table, pa.Table]:
    return window(6000, seed=1), window(4000, seed=2, shifted=DRIFTED)


def test_injected_drift_is_found_and_nothing_else(windows: tuple[pa.Table, pa.Table]) -> None:
    reference, current = windows
    report = check(reference, current, DriftCriteria())
    assert set(report.drifted_columns) == DRIFTED
    kinds = {c.column: (c.kind, c.test) for c in report.columns}
    assert kinds["n0"] == ("numerical", "wasserstein")
    assert kinds["c0"] == ("categorical", "jensenshannon")
    assert report.dataset.tested_columns == 9
    assert report.dataset.drifted_columns == 3
    assert report.dataset.share == pytest.approx(3 / 9)
    assert report.dataset.verdict == "ok"  # 3 of 9 is below the default drift_share of 0.5
    assert check(reference, current, DriftCriteria(drift_share=0.3)).dataset.verdict == "drift"


def test_same_distribution_raises_no_alarm(windows: tuple[pa.Table, pa.Table]) -> None:
    reference, _ = windows
    report = check(reference, window(3000, seed=3), DriftCriteria())
    assert report.drifted_columns == []
    assert all(c.verdict == "ok" for c in report.columns)


def test_verdicts_and_scores_agree_with_plain_evidently(
    windows: tuple[pa.Table, pa.Table],
) -> None:
    reference, current = windows
    report = check(reference, current, DriftCriteria())
    kinds = {c.column: c.kind for c in report.columns if c.kind is not None}
    plain = evidently_drift(reference, current, kinds)
    assert set(plain.columns) == set(kinds)
    for ours in report.columns:
        theirs = plain.columns[ours.column]
        assert (ours.test, ours.threshold, ours.drifted) == (
            theirs.test,
            theirs.threshold,
            theirs.drifted,
        )
        assert ours.score == pytest.approx(theirs.score, rel=1e-9)
    assert report.dataset.share == pytest.approx(plain.drifted_share)


def test_small_reference_uses_evidentlys_p_value_tests() -> None:
    reference = window(800, seed=4)
    current = window(500, seed=5, shifted=frozenset({"n0", "c0"}))
    report = check(reference, current, DriftCriteria(min_rows=100))
    assert report.column("n0").test == "ks"
    assert report.column("c0").test == "chisquare"
    assert set(report.drifted_columns) == {"n0", "c0"}
    kinds = {c.column: c.kind for c in report.columns if c.kind is not None}
    plain = evidently_drift(reference, current, kinds)
    for ours in report.columns:
        assert ours.drifted == plain.columns[ours.column].drifted, ours.column
        assert ours.score == pytest.approx(plain.columns[ours.column].score, abs=1e-9)


def test_policy_picks_the_test_and_threshold(windows: tuple[pa.Table, pa.Table]) -> None:
    reference, current = windows
    criteria = DriftCriteria(
        numerical_test="ks", numerical_threshold=0.01, categorical_test="chisquare"
    )
    report = check(reference, current, criteria)
    assert {(c.test, c.threshold) for c in report.columns if c.kind == "numerical"} == {
        ("ks", 0.01)
    }
    assert {c.test for c in report.columns if c.kind == "categorical"} == {"chisquare"}
    assert {"n1", "n4", "c2"} <= set(report.drifted_columns)
    strict = check(reference, current, DriftCriteria(numerical_threshold=0.6))
    assert not {"n1", "n4"} & set(strict.drifted_columns)  # a 0.5 sd shift scores about 0.5


def test_columns_and_exclusions(windows: tuple[pa.Table, pa.Table]) -> None:
    reference, current = windows
    only = check(reference, current, DriftCriteria(columns=("n1", "c0")))
    assert [c.column for c in only.columns] == ["n1", "c0"]
    rest = check(reference, current, DriftCriteria(exclude_columns=("n1", "n4")))
    assert "n1" not in {c.column for c in rest.columns}
    assert set(rest.drifted_columns) == {"c2"}


def test_kinds_are_inferred_from_arrow_types_like_evidently() -> None:
    table = pa.table(
        {
            "f": pa.array([0.5, 1.5] * 50),
            "few_ints": pa.array(list(range(10)) * 10),
            "many_ints": pa.array((list(range(11)) * 10)[:100]),
            "s": pa.array(["a", "b"] * 50),
            "d": pa.array(["a", "b"] * 50).dictionary_encode(),
            "b": pa.array([True, False] * 50),
            "t": pa.array(np.arange(100).astype("datetime64[s]")),
        }
    )
    kinds = {name: infer_kind(table.column(name)) for name in table.column_names}
    assert kinds == {
        "f": "numerical",
        "few_ints": "categorical",
        "many_ints": "numerical",
        "s": "categorical",
        "d": "categorical",
        "b": "categorical",
        "t": None,
    }
    report = check(table, table, DriftCriteria(min_rows=10))
    assert report.skipped == {"t": "type timestamp[s] is not checked"}
    explicit = check(table, table, DriftCriteria(min_rows=10), kinds={"few_ints": "numerical"})
    assert explicit.column("few_ints").kind == "numerical"


def test_data_quality_missing_unseen_and_out_of_range() -> None:
    rng = np.random.default_rng(7)
    reference = pa.table(
        {
            "x": pa.array(rng.uniform(0, 10, 2000)),
            "c": pa.array(rng.choice(["a", "b"], 2000)),
        }
    )
    x = rng.uniform(0, 10, 1000)
    x[:50] = 12.0  # above the reference's max
    x[50:80] = -1.0  # below its min
    x[80:180] = np.nan
    c = rng.choice(["a", "b"], 1000).astype(object)
    c[:30] = "new"
    c[30:40] = "newer"
    c[40:140] = None
    current = pa.table({"x": pa.array(x), "c": pa.array(c, pa.string())})
    report = check(reference, current, DriftCriteria(min_rows=100))
    qx, qc = report.quality
    assert qx.missing_share_reference == 0.0
    assert qx.missing_share_current == pytest.approx(100 / 1000)
    assert qx.out_of_range_share == pytest.approx(80 / 900)
    assert qx.reference_min is not None
    assert 0 <= qx.reference_min < 0.1
    assert qc.missing_share_current == pytest.approx(100 / 1000)
    assert qc.unseen_categories == ("new", "newer")
    assert qc.unseen_category_count == 2
    assert qc.unseen_share == pytest.approx(40 / 900)


def test_prediction_drift_and_classification_accuracy() -> None:
    rng = np.random.default_rng(8)
    n = 3000
    labels = rng.integers(0, 3, n)
    right = rng.random(n) < 0.9
    reference = pa.table(
        {
            "x": pa.array(rng.normal(0, 1, n)),
            "pred": pa.array(np.where(right, labels, (labels + 1) % 3)),
            "label": pa.array(labels),
        }
    )
    cur_labels = rng.integers(0, 3, n)
    cur_right = rng.random(n) < 0.6
    cur_pred = np.where(cur_right, cur_labels, 2)  # a model that falls back to class 2
    # Labels arrive late: the first 500 rows have none yet.
    label_column = pa.array(np.where(np.arange(n) < 500, np.nan, cur_labels), from_pandas=True)
    current = pa.table(
        {"x": pa.array(rng.normal(0, 1, n)), "pred": pa.array(cur_pred), "label": label_column}
    )
    criteria = DriftCriteria(prediction_column="pred", label_column="label")
    report = check(reference, current, criteria)
    assert [c.column for c in report.columns] == ["x"]
    assert report.prediction is not None
    assert report.prediction.kind == "categorical"
    assert report.prediction.verdict == "drift"
    perf = report.performance
    assert perf is not None
    assert perf.metric == "accuracy"
    assert perf.reference_rows == n
    assert perf.current_rows == n - 500
    expected = float(np.mean(cur_pred[500:] == cur_labels[500:]))
    assert perf.current == pytest.approx(expected)
    assert perf.reference == pytest.approx(float(np.mean(right)))
    assert perf.current < perf.reference - 0.1


def test_regression_mae_and_too_few_labels() -> None:
    rng = np.random.default_rng(9)
    n = 2000
    truth = rng.normal(10, 2, n)
    ref_pred = truth + rng.normal(0, 0.5, n)
    reference = pa.table({"pred": pa.array(ref_pred), "y": pa.array(truth)})
    cur_truth = rng.normal(10, 2, n)
    cur_pred = cur_truth + 1.0
    current = pa.table({"pred": pa.array(cur_pred), "y": pa.array(cur_truth)})
    criteria = DriftCriteria(prediction_column="pred", label_column="y")
    perf = check(reference, current, criteria).performance
    assert perf is not None
    assert perf.metric == "mae"
    assert perf.current == pytest.approx(1.0)
    assert perf.reference == pytest.approx(float(np.mean(np.abs(ref_pred - truth))))
    late = pa.array([None] * (n - 10) + list(cur_truth[:10]), pa.float64())
    few = current.set_column(1, "y", late)
    perf = check(reference, few, criteria).performance
    assert perf is not None
    assert perf.verdict == "insufficient data"
    assert perf.current is None
    assert perf.current_rows == 10


def test_report_is_plain_json(windows: tuple[pa.Table, pa.Table]) -> None:
    reference, current = windows
    report = check(reference, current.drop_columns(["n0"]), DriftCriteria())
    summary = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert summary["dataset"]["drifted_columns"] == 3
    assert summary["columns"][0] == {
        "column": "n0",
        "kind": None,
        "test": None,
        "threshold": None,
        "score": None,
        "drifted": False,
        "verdict": "insufficient data",
        "reference_rows": 0,
        "current_rows": 0,
        "reason": "missing from the current window",
    }


def test_policy_carries_a_drift_section_with_defaults() -> None:
    policy = default_policy()
    assert policy.drift.drift_share == 0.5
    assert policy.drift.numerical_test == "auto"
    assert Policy.model_validate_json(policy.model_dump_json()) == policy
    stored = policy.model_dump(mode="json")
    del stored["drift"]  # a policy stored before the section existed still loads
    assert Policy.model_validate(stored).drift == DriftCriteria()
    with pytest.raises(ValidationError, match="p-value"):
        DriftCriteria(numerical_test="ks", numerical_threshold=1.5)
    with pytest.raises(ValidationError):
        DriftCriteria(min_rows=0)
    assert all(f.description for f in DriftCriteria.model_fields.values())


def test_chunked_tables_give_the_same_report(windows: tuple[pa.Table, pa.Table]) -> None:
    # Tables read from Parquet come in many record batches.
    reference, current = windows
    chunked = pa.Table.from_batches(current.to_batches(max_chunksize=700))
    assert chunked.column("n0").num_chunks > 1
    assert check(reference, chunked, DriftCriteria()) == check(reference, current, DriftCriteria())
