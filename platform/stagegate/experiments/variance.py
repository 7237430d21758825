# TEMPORARY stand-in (not to be committed): the helper's module replaces it.
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


def winsorize(
    values: ArrayLike, *, cap: float | None = None, upper_quantile: float | None = None
) -> NDArray[np.float64]:
    v = np.asarray(values, dtype=np.float64)
    if cap is None and upper_quantile is not None:
        cap = float(np.quantile(v, upper_quantile))
    return v if cap is None else np.minimum(v, cap)


@dataclass(frozen=True)
class CupedResult:
    treatment: NDArray[np.float64]
    control: NDArray[np.float64]
    theta: float
    variance_reduction: float


def cuped(yt: ArrayLike, xt: ArrayLike, yc: ArrayLike, xc: ArrayLike) -> CupedResult:
    yt, xt, yc, xc = (np.asarray(a, dtype=np.float64) for a in (yt, xt, yc, xc))
    x = np.concatenate([xt, xc])
    y = np.concatenate([yt, yc])
    vx = x.var()
    theta = float(np.cov(x, y)[0, 1] / x.var(ddof=1)) if vx > 0 else 0.0
    m = x.mean()
    at, ac = yt - theta * (xt - m), yc - theta * (xc - m)
    adj = np.concatenate([at, ac])
    vr = 1 - adj.var() / y.var() if y.var() > 0 else 0.0
    return CupedResult(at, ac, theta, float(vr))
