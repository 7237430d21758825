"""Winsorising against scipy's, CUPED against statsmodels' regressions, and CUPED's variance
reduction on simulated log-normal data against the 1 - rho^2 that theory promises."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy.stats import mstats

from stagegate.experiments.variance import cuped, winsorize


@pytest.mark.parametrize(("n", "q"), [(1000, 0.99), (997, 0.95), (50, 0.9), (10, 0.8), (7, 0.999)])
def test_winsorize_by_quantile_matches_scipy(n: int, q: float) -> None:
    rng = np.random.default_rng(n)
    values = np.round(rng.lognormal(0, 1.5, n), 1)  # heavy tail, with ties
    expected = np.asarray(mstats.winsorize(values, limits=(0, 1 - q)))
    np.testing.assert_array_equal(winsorize(values, upper_quantile=q), expected)


def test_winsorize_by_cap_and_refusals() -> None:
    values = np.array([1.0, 5.0, 250.0, 3.0])
    np.testing.assert_array_equal(winsorize(values, cap=10.0), [1.0, 5.0, 10.0, 3.0])
    assert winsorize([], upper_quantile=0.9).size == 0
    with pytest.raises(ValueError, match="exactly one"):
        winsorize(values)
    with pytest.raises(ValueError, match="exactly one"):
        winsorize(values, cap=1.0, upper_quantile=0.9)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        winsorize(values, upper_quantile=0.0)
    with pytest.raises(ValueError, match="NaN"):
        winsorize([1.0, math.nan], cap=1.0)


def _lognormal_pair(
    rng: np.random.Generator, n: int, r: float, sigma: float = 1.0, lift: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Pre-period x and outcome y, log-normal with correlated logs (corr r)."""
    a = rng.standard_normal(n)
    b = r * a + math.sqrt(1 - r * r) * rng.standard_normal(n)
    return np.exp(sigma * a), np.exp(sigma * b) * (1 + lift)


def test_cuped_against_statsmodels() -> None:
    rng = np.random.default_rng(5)
    xt, yt = _lognormal_pair(rng, 4000, 0.7, lift=0.05)
    xc, yc = _lognormal_pair(rng, 5000, 0.7)
    result = cuped(yt, xt, yc, xc)
    y, x = np.r_[yt, yc], np.r_[xt, xc]
    treated = np.r_[np.ones(yt.size), np.zeros(yc.size)]
    # theta is the pooled OLS slope of y on x.
    slope = sm.OLS(y, sm.add_constant(x)).fit().params[1]
    assert result.theta == pytest.approx(slope, rel=1e-10)
    # The adjusted difference is the treatment coefficient of OLS on the adjusted outcome ...
    adjusted = y - slope * x
    coef = sm.OLS(adjusted, sm.add_constant(treated)).fit().params[1]
    assert result.treatment.mean() - result.control.mean() == pytest.approx(coef, rel=1e-9)
    # ... and agrees with ANCOVA (OLS of y on treatment and x, a within-arm slope) well
    # inside ANCOVA's standard error: randomisation balances x across the arms.
    ancova = sm.OLS(y, np.column_stack([np.ones(y.size), treated, x])).fit()
    assert abs(coef - ancova.params[1]) < 0.1 * ancova.bse[1]
    # Centring on the pooled mean leaves the pooled mean of the outcome unchanged.
    assert np.r_[result.treatment, result.control].mean() == pytest.approx(y.mean())


@pytest.mark.parametrize(("r", "sigma"), [(0.9, 0.5), (0.8, 1.0), (0.5, 0.8)])
def test_cuped_cuts_the_variance_by_rho_squared_on_lognormal_data(r: float, sigma: float) -> None:
    rng = np.random.default_rng(int(r * 100))
    xt, yt = _lognormal_pair(rng, 200_000, r, sigma)
    xc, yc = _lognormal_pair(rng, 200_000, r, sigma)
    # The correlation of two log-normals whose logs correlate at r (equal sigmas).
    rho = (math.exp(r * sigma**2) - 1) / (math.exp(sigma**2) - 1)
    result = cuped(yt, xt, yc, xc)
    assert result.variance_reduction == pytest.approx(rho**2, abs=0.02)


def test_cuped_shrinks_the_variance_of_the_estimated_difference() -> None:
    """Over 400 simulated A/A experiments, the difference of adjusted means varies
    (1 - rho^2) as much as the raw one, and stays centred on 0."""
    rng = np.random.default_rng(9)
    r, sigma, n, reps = 0.8, 1.0, 2000, 400
    rho = (math.exp(r * sigma**2) - 1) / (math.exp(sigma**2) - 1)
    raw, adjusted = [], []
    for _ in range(reps):
        xt, yt = _lognormal_pair(rng, n, r, sigma)
        xc, yc = _lognormal_pair(rng, n, r, sigma)
        result = cuped(yt, xt, yc, xc)
        raw.append(yt.mean() - yc.mean())
        adjusted.append(result.treatment.mean() - result.control.mean())
    ratio = np.var(adjusted) / np.var(raw)
    assert ratio == pytest.approx(1 - rho**2, rel=0.2)
    assert abs(np.mean(adjusted)) < 3 * np.std(adjusted) / math.sqrt(reps)


def test_cuped_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="one pre-period value per unit"):
        cuped([1.0, 2.0], [1.0], [1.0, 2.0], [3.0, 4.0])
    with pytest.raises(ValueError, match="all equal"):
        cuped([1.0, 2.0], [1.0, 1.0], [1.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="at least 3"):
        cuped([1.0], [1.0], [2.0], [3.0])
    with pytest.raises(ValueError, match="NaN"):
        cuped([1.0, math.inf], [1.0, 2.0], [1.0, 2.0], [3.0, 4.0])
