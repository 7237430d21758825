"""Our drift statistics give Evidently's numbers: each is run against Evidently's own test
function on the same samples, and the test choice against Evidently's own choice."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from stagegate.monitoring import drift
from stagegate.monitoring.evidently import evidently_stattest

RNG = np.random.default_rng(20260101)


def _sorted(values: np.ndarray) -> np.ndarray:
    return np.sort(values.astype(np.float64))


@pytest.mark.parametrize(
    ("n", "m", "shift"),
    [(5000, 5000, 0.0), (5000, 3001, 0.2), (2000, 7000, -0.05), (1500, 1500, 1.0)],
)
def test_wasserstein_equals_evidentlys(n: int, m: int, shift: float) -> None:
    ref = RNG.normal(0, 2, n)
    cur = RNG.normal(shift, 2, m)
    name, expected, drifted = evidently_stattest(ref, cur, "numerical")
    assert name == "wasserstein"
    ours = drift.wasserstein_normed(_sorted(ref), _sorted(cur))
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert drift.is_drift("wasserstein", ours, 0.1) == drifted


def test_wasserstein_with_ties_and_integers() -> None:
    # Many repeated values: the merge must count ties the way the CDFs do.
    ref = RNG.integers(0, 40, 3000)
    cur = RNG.integers(3, 45, 2000)
    _, expected, _ = evidently_stattest(ref, cur, "numerical", "wasserstein")
    assert drift.wasserstein_normed(_sorted(ref), _sorted(cur)) == pytest.approx(expected)
    assert expected == pytest.approx(stats.wasserstein_distance(ref, cur) / np.std(ref))


def test_wasserstein_constant_reference_uses_evidentlys_floor() -> None:
    ref = np.full(2000, 3.0)
    cur = np.full(1000, 3.0005)
    _, expected, _ = evidently_stattest(ref, cur, "numerical", "wasserstein")
    assert drift.wasserstein_normed(ref, cur) == pytest.approx(expected)  # 0.0005 / 0.001


def _counts(ref: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rk, rc = drift.distinct_sorted(_sorted(ref))
    ck, cc = drift.distinct_sorted(_sorted(cur))
    return drift.aligned_counts(rk, rc, ck, cc)


@pytest.mark.parametrize("unseen", [False, True])
def test_jensenshannon_equals_evidentlys(unseen: bool) -> None:
    ref = RNG.choice(5, 4000, p=[0.4, 0.3, 0.2, 0.05, 0.05])
    cur = RNG.choice(6 if unseen else 5, 2500)
    _, expected, drifted = evidently_stattest(ref, cur, "categorical", "jensenshannon")
    ours = drift.jensenshannon(*_counts(ref, cur))
    assert ours == pytest.approx(expected, rel=1e-12)
    assert drift.is_drift("jensenshannon", ours, 0.1) == drifted


def test_jensenshannon_binned_like_evidently_for_many_values() -> None:
    ref = RNG.normal(0, 1, 3000)
    cur = RNG.normal(0.3, 1.2, 2000)
    _, expected, _ = evidently_stattest(ref, cur, "numerical", "jensenshannon")
    ours = drift.jensenshannon(*drift.sturges_counts(_sorted(ref), _sorted(cur)))
    assert ours == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("unseen", [False, True])
def test_chisquare_equals_evidentlys(unseen: bool) -> None:
    ref = RNG.choice(4, 600, p=[0.4, 0.3, 0.2, 0.1])
    cur = RNG.choice(5 if unseen else 4, 300, p=[0.3, 0.3, 0.2, 0.1, 0.1] if unseen else None)
    _, expected, drifted = evidently_stattest(ref, cur, "categorical", "chisquare")
    ours = drift.chisquare_pvalue(*_counts(ref, cur))
    assert ours == pytest.approx(expected, abs=1e-12)
    assert drift.is_drift("chisquare", ours, 0.05) == drifted
    if unseen:
        assert ours == 0.0  # a category the reference never had: infinitely unlikely


@pytest.mark.parametrize("p_current", [0.5, 0.58, 0.8])
def test_z_equals_evidentlys(p_current: float) -> None:
    ref = RNG.choice(2, 500, p=[0.5, 0.5])
    cur = RNG.choice(2, 400, p=[1 - p_current, p_current])
    _, expected, drifted = evidently_stattest(ref, cur, "categorical", "z")
    ours = drift.z_pvalue(*_counts(ref, cur))
    assert ours == pytest.approx(expected, abs=1e-9)
    assert drift.is_drift("z", ours, 0.05) == drifted


def test_ks_equals_evidentlys() -> None:
    ref = RNG.normal(0, 1, 800)
    cur = RNG.normal(0.2, 1, 300)
    name, expected, drifted = evidently_stattest(ref, cur, "numerical")
    assert name == "ks"
    ours = drift.ks_pvalue(_sorted(ref), _sorted(cur))
    assert ours == pytest.approx(expected)
    assert drift.is_drift("ks", ours, 0.05) == drifted


@pytest.mark.parametrize(
    ("kind", "n", "distinct"),
    [
        ("numerical", 1001, 100),
        ("numerical", 1001, 5),
        ("numerical", 1000, 6),
        ("numerical", 1000, 4),
        ("numerical", 1000, 2),
        ("categorical", 1001, 2),
        ("categorical", 1000, 3),
        ("categorical", 1000, 2),
    ],
)
def test_auto_test_is_evidentlys_choice(kind: str, n: int, distinct: int) -> None:
    # Sizes at Evidently's boundaries: 1000 reference rows, 5 and 2 distinct values.
    ref = RNG.integers(0, distinct, n).astype(np.float64)
    ref[:distinct] = np.arange(distinct)
    cur = RNG.integers(0, distinct, 700).astype(np.float64)
    name, _, _ = evidently_stattest(ref, cur, "numerical" if kind == "numerical" else "categorical")
    assert drift.auto_test(kind, n, distinct) == name  # type: ignore[arg-type]
