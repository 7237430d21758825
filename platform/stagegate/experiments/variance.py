"""Variance reduction for heavy-tailed metrics: winsorising (a cap set by policy) and CUPED
(each unit's pre-period value of the same metric as the covariate)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


def _vector(values: ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def winsorize(
    values: ArrayLike, *, cap: float | None = None, upper_quantile: float | None = None
) -> FloatArray:
    """Values above a cap replaced by the cap: a fixed `cap` (the policy's), or the
    `upper_quantile` of these values (the top int(n * (1 - q)) values take the largest value
    below them, as `scipy.stats.mstats.winsorize(limits=(0, 1 - q))` does). Exactly one."""
    if (cap is None) == (upper_quantile is None):
        raise ValueError("give exactly one of cap and upper_quantile")
    arr = _vector(values, "values")
    if cap is not None:
        if math.isnan(cap):
            raise ValueError("cap must be a number")
        return np.minimum(arr, cap)
    assert upper_quantile is not None
    if not 0 < upper_quantile <= 1:
        raise ValueError("upper_quantile must be in (0, 1]")
    n = arr.size
    k = int(n * (1.0 - upper_quantile))
    if k == 0:
        return arr.copy()
    threshold = float(np.partition(arr, n - k - 1)[n - k - 1])
    return np.minimum(arr, threshold)


@dataclass(frozen=True)
class CupedResult:
    treatment: FloatArray  # adjusted outcomes
    control: FloatArray
    theta: float  # pooled cov(x, y) / var(x)
    variance_reduction: float  # 1 - var(adjusted) / var(raw), pooled


def cuped(
    y_treatment: ArrayLike, x_treatment: ArrayLike, y_control: ArrayLike, x_control: ArrayLike
) -> CupedResult:
    """y - theta * (x - mean(x)), with theta and mean(x) pooled over both arms, so the
    adjustment is the same function of x in each arm and the difference stays unbiased.

    The variance falls by rho^2, rho the correlation of x and y; the adjusted outcomes feed
    `sequential_test` as a continuous metric."""
    yt, xt = _vector(y_treatment, "y_treatment"), _vector(x_treatment, "x_treatment")
    yc, xc = _vector(y_control, "y_control"), _vector(x_control, "x_control")
    if yt.size != xt.size or yc.size != xc.size:
        raise ValueError("each arm needs one pre-period value per unit")
    y = np.concatenate([yt, yc])
    x = np.concatenate([xt, xc])
    if y.size < 3:
        raise ValueError("CUPED needs at least 3 units")
    x_mean = float(x.mean())
    var_x = float(np.var(x))
    if var_x == 0:
        raise ValueError("the pre-period values are all equal: nothing to adjust with")
    theta = float(np.mean((x - x_mean) * (y - y.mean()))) / var_x
    adj_t = yt - theta * (xt - x_mean)
    adj_c = yc - theta * (xc - x_mean)
    var_y = float(np.var(y))
    var_adj = float(np.var(np.concatenate([adj_t, adj_c])))
    reduction = 1.0 - var_adj / var_y if var_y > 0 else 0.0
    return CupedResult(adj_t, adj_c, theta, reduction)
