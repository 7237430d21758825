"""Always-valid sequential A/B test of a difference in means: a normal-mixture mSPRT, optionally
truncated at a maximum sample whose last look spends the alpha the truncation left unspent.

Why it stays valid however often the canary flow looks (docs/experiments.md has the argument):

- Untruncated (`max_samples=None`): the mixture likelihood ratio is a nonnegative martingale
  under "no difference", so by Ville's inequality P(it ever reaches 1/alpha) <= alpha, for any
  looks at any times, even looks chosen from the data.
- Truncated: before each arm reaches `max_samples` the same mSPRT boundary applies. Its
  probability of being crossed by a Brownian path monitored continuously up to the maximum is
  computed exactly (numerical integration), and the last look, at `max_samples` per arm,
  rejects when |z| >= c, with c chosen so that that crossing probability plus the last look's
  share is alpha. Every look schedule inside [0, max_samples] rejects only if the continuous
  path does, so the bound holds for all of them.

Variances are plug-in estimates (Bernoulli ones with one success and one failure added, so an
arm with no conversions yet has a variance), so validity is asymptotic in the sample size, as
for every z-test; benchmarks/ab_sequential.py measures it on conversion data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Metric = Literal["bernoulli", "continuous"]
FloatArray = NDArray[np.float64]

# When no MDE is given the mixture is tuned for an effect of a tenth of a standard deviation.
DEFAULT_MDE_IN_SD = 0.1
# Integration grid of the crossing probability: time steps (denser near 0, where the boundary
# bends most) and space points (Simpson's rule, odd). Checked against closed forms in the tests.
_TIME_STEPS = 60
_SPACE_POINTS = 161
# The smallest p-value reported: below it the integration's rounding (~1e-9) dominates.
P_FLOOR = 1e-8
# log(rho) grid over which the last look's critical value is tabulated and interpolated.
_RHO_GRID = np.linspace(math.log(1e-3), math.log(1e3), 31)


@dataclass(frozen=True)
class SequentialResult:
    """One look at the experiment: the estimate, its confidence sequence and its p-value."""

    metric: str
    n_treatment: int
    n_control: int
    mean_treatment: float
    mean_control: float
    estimate: float  # mean_treatment - mean_control
    lower: float  # always-valid two-sided (1 - alpha) confidence sequence at this look
    upper: float
    p_value: float  # always-valid p-value for "no difference" at this look
    alpha: float = 0.05
    final_look: bool = False  # the truncated design's last look (each arm at max_samples)
    max_samples: int | None = None  # per-arm truncation of the design, if any

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain values; an undefined mean is NaN and an unbounded side is +-inf."""
        return {
            k: (int(v) if isinstance(v, bool) else v)
            for k, v in asdict(self).items()
            if v is not None
        }

    @property
    def rejects(self) -> bool:
        """Whether "no difference" is rejected at this look (the interval excludes 0)."""
        return self.lower > 0 or self.upper < 0


# --- the mixture statistic -------------------------------------------------------------------


def mixture_log_lr(estimate: ArrayLike, variance: ArrayLike, tau2: ArrayLike) -> FloatArray:
    """log of the normal-mixture likelihood ratio for "no difference".

    With the estimate d ~ N(theta, V) and theta ~ N(0, tau^2) under the alternative,
    LR = N(d; 0, V + tau^2) / N(d; 0, V)."""
    d, v, t2 = (np.asarray(a, dtype=np.float64) for a in (estimate, variance, tau2))
    with np.errstate(divide="ignore", invalid="ignore"):
        out: FloatArray = 0.5 * np.log(v / (v + t2)) + t2 * d * d / (2.0 * v * (v + t2))
    return out


def mixture_halfwidth(variance: ArrayLike, tau2: ArrayLike, alpha: float) -> FloatArray:
    """Half-width of the mSPRT confidence sequence: {theta: LR(theta) < 1/alpha} = d +- this."""
    v, t2 = (np.asarray(a, dtype=np.float64) for a in (variance, tau2))
    with np.errstate(divide="ignore", invalid="ignore"):
        out: FloatArray = np.sqrt(
            v * (v + t2) / t2 * (np.log((v + t2) / v) + 2.0 * math.log(1.0 / alpha))
        )
    return out


def _mixture_boundary(rho: float, alpha: float) -> Callable[[FloatArray], FloatArray]:
    """The mSPRT boundary for W(t) = z * sqrt(t), t = information / final information.

    With r = tau^2 * information = rho * t, |z| >= sqrt((1 + r) / r * (log(1 + r) + 2 log(1/a)))
    becomes |W(t)| >= sqrt((1 + rho t) / rho * (log(1 + rho t) + 2 log(1/a)))."""
    two_log = 2.0 * math.log(1.0 / alpha)

    def g(t: FloatArray) -> FloatArray:
        out: FloatArray = np.sqrt((1.0 + rho * t) / rho * (np.log1p(rho * t) + two_log))
        return out

    return g


# --- crossing probabilities of a Brownian motion ---------------------------------------------


@dataclass(frozen=True)
class Crossing:
    """A two-sided boundary for W on (0, 1]: crossing probability and what stays inside."""

    probability: float  # P(|W(t)| >= g(t) for some monitored t <= 1)
    x: FloatArray  # grid at t = 1, inside [-g(1), g(1)]
    density: FloatArray  # sub-density at t = 1 of the paths that never crossed

    def tail(self, c: float) -> float:
        """P(no crossing and |W(1)| >= c), the density integrated by the trapezoid rule."""
        return self._outer(c, self.x, self.density) + self._outer(
            c, -self.x[::-1], self.density[::-1]
        )

    @staticmethod
    def _outer(c: float, x: FloatArray, f: FloatArray) -> float:
        # mass above c: cumulative trapezoid from the top edge, linear in between points
        if c >= x[-1]:
            return 0.0
        cells = 0.5 * (f[1:] + f[:-1]) * np.diff(x)
        above = np.concatenate([np.cumsum(cells[::-1])[::-1], [0.0]])
        i = int(np.searchsorted(x, c, side="right")) - 1
        if i < 0:
            return float(above[0])
        frac = (c - x[i]) / (x[i + 1] - x[i])
        f_c = f[i] + frac * (f[i + 1] - f[i])
        return float(above[i + 1] + 0.5 * (f_c + f[i + 1]) * (x[i + 1] - c))


def crossing(
    boundary: Callable[[FloatArray], FloatArray],
    times: ArrayLike | None = None,
    *,
    drift: float = 0.0,
    continuous: bool = True,
    points: int = _SPACE_POINTS,
) -> Crossing:
    """Crossing of |W(t)| >= g(t) by W(t) = drift * t + B(t), by recursive integration.

    `continuous=True` monitors every instant (a Brownian-bridge correction between grid times,
    exact for a boundary linear between them); `continuous=False` looks only at `times`, as a
    group-sequential design does. `times` must increase to 1."""
    if times is None:
        times = (np.arange(1, _TIME_STEPS + 1) / _TIME_STEPS) ** 3
    ts = np.asarray(times, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0 or ts[0] <= 0 or np.any(np.diff(ts) <= 0):
        raise ValueError("times must increase from above 0")
    if points < 5 or points % 2 == 0:
        raise ValueError("points must be odd and at least 5")
    bounds = boundary(ts)
    g_prev = float(boundary(np.zeros(1))[0]) if continuous else math.inf
    x_prev = np.zeros(1)
    mass_prev = np.ones(1)
    t_prev = 0.0
    weights = np.full(points, 2.0)
    weights[1::2] = 4.0
    weights[0] = weights[-1] = 1.0
    for t, g in zip(ts, bounds, strict=True):
        dt = t - t_prev
        # Only where the paths can be: 7 standard deviations around the drift, inside +-g.
        spread = 7.0 * math.sqrt(t)
        x = np.linspace(max(-g, drift * t - spread), min(g, drift * t + spread), points)
        step = x[:, None] - x_prev[None, :] - drift * dt
        kernel = np.exp(-0.5 * step * step / dt) / math.sqrt(2.0 * math.pi * dt)
        if continuous:
            # A Brownian bridge from x_prev to x crosses a line from g_prev to g with
            # probability exp(-2 (g_prev - x_prev)(g - x) / dt); likewise for the lower line.
            up = np.exp(-2.0 * (g_prev - x_prev)[None, :] * (g - x)[:, None] / dt)
            low = np.exp(-2.0 * (g_prev + x_prev)[None, :] * (g + x)[:, None] / dt)
            kernel *= np.clip(1.0 - up - low, 0.0, None)
        density = kernel @ mass_prev
        mass_prev = density * weights * (x[1] - x[0]) / 3.0
        x_prev, t_prev, g_prev = x, t, g
    return Crossing(probability=float(1.0 - mass_prev.sum()), x=x_prev, density=density)


def _bisect(f: Callable[[float], float], lo: float, hi: float, tol: float) -> float:
    """Where a decreasing f crosses 0 on [lo, hi] (f(lo) > 0 >= f(hi)), the upper end."""
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return hi


def _last_look_c(rho: float, alpha: float) -> float:
    """Critical |z| of the last look: early crossing plus the last look's share make alpha."""
    cross = crossing(_mixture_boundary(rho, alpha))
    left = alpha - cross.probability
    if left <= 0:  # Ville's inequality makes this impossible; the guard keeps a bad grid loud
        raise ArithmeticError(f"no alpha left for the last look (rho={rho}, alpha={alpha})")
    return float(_bisect(lambda c: cross.tail(c) - left, 0.0, float(cross.x[-1]), 1e-9))


@lru_cache(maxsize=16)
def _c_table(alpha: float) -> Callable[[FloatArray], FloatArray]:
    from scipy import interpolate  # type: ignore[import-untyped]  # lazily: a 1 s import

    values = [_last_look_c(math.exp(r), alpha) for r in _RHO_GRID]
    table: Callable[[FloatArray], FloatArray] = interpolate.PchipInterpolator(_RHO_GRID, values)
    return table


def final_critical_value(rho: ArrayLike, alpha: float) -> FloatArray:
    """The last look's critical |z| for rho = tau^2 / (variance at the maximum sample).

    Tabulated once per alpha over log(rho) in [1e-3, 1e3] and interpolated; below the grid the
    value at 1e-3 is used (c grows with rho, so that errs on the safe side), above it the value
    is computed directly."""
    r = np.asarray(rho, dtype=np.float64)
    table = _c_table(float(alpha))
    out = np.atleast_1d(table(np.log(np.clip(r, math.exp(_RHO_GRID[0]), math.exp(_RHO_GRID[-1])))))
    high = r > math.exp(_RHO_GRID[-1])
    if np.any(high):
        out[high] = [_last_look_c(float(v), alpha) for v in r[high]]
    result: FloatArray = np.asarray(out, dtype=np.float64)
    return result


def _last_look_p(z: float, rho: float) -> float:
    """Smallest level a whose truncated design (at level a) rejects |z| at the last look.

    Levels are searched up to 0.5; above that the p-value is reported as 1, which is valid
    (conservative) and keeps the search inside the range where c(a) falls as a grows."""

    def excess(a: float) -> float:
        cross = crossing(_mixture_boundary(rho, a))
        return cross.probability + cross.tail(abs(z)) - a

    lo, hi = P_FLOOR, 0.5
    if excess(hi) > 0:
        return 1.0
    if excess(lo) <= 0:
        return lo
    return _bisect(excess, lo, hi, 1e-7)


# --- the test -------------------------------------------------------------------------------


def arm_variance(
    n: ArrayLike, total: ArrayLike, total_sq: ArrayLike | None, metric: Metric
) -> FloatArray:
    """Plug-in per-unit variance of an arm from its count, sum and sum of squares.

    Bernoulli: p(1 - p) with p = (successes + 1) / (n + 2), never 0. Continuous: the unbiased
    sample variance (NaN below 2 units)."""
    nn = np.asarray(n, dtype=np.float64)
    s = np.asarray(total, dtype=np.float64)
    if metric == "bernoulli":
        p = (s + 1.0) / (nn + 2.0)
        out: FloatArray = p * (1.0 - p)
        return out
    if total_sq is None:
        raise ValueError("a continuous metric needs the sum of squares")
    ss = np.asarray(total_sq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (ss - s * s / nn) / (nn - 1.0)
    cont: FloatArray = np.where(nn >= 2, np.maximum(var, 0.0), np.nan)
    return cont


def bounds(
    estimate: ArrayLike,
    variance: ArrayLike,
    tau2: ArrayLike,
    alpha: float,
    *,
    final: ArrayLike = False,
    final_variance: ArrayLike | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Vectorised core: (half-width of the confidence sequence, log mixture LR).

    `variance` is that of the estimate at this look. Where `final` is true the look is the
    truncated design's last one and the half-width is c * sqrt(variance), c from
    `final_critical_value` with rho = tau^2 / final_variance (the variance at the maximum)."""
    v = np.asarray(variance, dtype=np.float64)
    t2 = np.broadcast_to(np.asarray(tau2, dtype=np.float64), v.shape)
    half = mixture_halfwidth(v, t2, alpha)
    log_lr = mixture_log_lr(estimate, v, t2)
    last = np.broadcast_to(np.asarray(final, dtype=bool), v.shape)
    if np.any(last):
        vf = v if final_variance is None else np.asarray(final_variance, dtype=np.float64)
        vf = np.broadcast_to(vf, v.shape)
        c = final_critical_value(t2[last] / vf[last], alpha)
        half = np.array(half, copy=True)
        half[last] = c * np.sqrt(v[last])
    return half, log_lr


def fixed_horizon_samples(
    mde: float,
    variance_treatment: float,
    variance_control: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
) -> int:
    """Per-arm sample of the two-sided fixed-horizon z-test with this power at `mde`."""
    if mde <= 0 or not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError("need mde > 0, 0 < alpha < 1 and 0 < power < 1")
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return math.ceil(z * z * (variance_treatment + variance_control) / mde**2)


def _as_units(values: ArrayLike, name: str, metric: Metric) -> FloatArray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a one-dimensional array of per-unit outcomes")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values")
    if metric == "bernoulli" and not np.all((arr == 0) | (arr == 1)):
        raise ValueError(f"{name}: a bernoulli metric takes only 0 and 1")
    return arr


def sequential_test(
    treatment: ArrayLike,
    control: ArrayLike,
    *,
    alpha: float = 0.05,
    metric: Metric = "continuous",
    mde: float | None = None,
    max_samples: int | None = None,
) -> SequentialResult:
    """The test at this look, on every unit so far (in arrival order, for the truncation).

    `mde`: the absolute effect the mixture is tuned for (tau = mde); default a tenth of the
    pooled standard deviation. `max_samples`: per-arm truncation; units past it are ignored,
    and the look where both arms have it is the last, which spends the remaining alpha."""
    if metric not in ("bernoulli", "continuous"):
        raise ValueError(f"metric must be 'bernoulli' or 'continuous', not {metric!r}")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    if mde is not None and not (math.isfinite(mde) and mde > 0):
        raise ValueError("mde must be a positive number")
    if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 2):
        raise ValueError("max_samples must be an integer of at least 2")
    t = _as_units(treatment, "treatment", metric)
    c = _as_units(control, "control", metric)
    if max_samples is not None:
        t, c = t[:max_samples], c[:max_samples]
    nt, nc = t.size, c.size
    mt = float(t.mean()) if nt else math.nan
    mc = float(c.mean()) if nc else math.nan
    d = mt - mc
    final = max_samples is not None and nt == max_samples and nc == max_samples

    def result(lower: float, upper: float, p_value: float) -> SequentialResult:
        return SequentialResult(
            metric=metric,
            n_treatment=nt,
            n_control=nc,
            mean_treatment=mt,
            mean_control=mc,
            estimate=d,
            lower=lower,
            upper=upper,
            p_value=p_value,
            alpha=alpha,
            final_look=final,
            max_samples=max_samples,
        )

    if nt < 2 or nc < 2:
        return result(-math.inf, math.inf, 1.0)
    sq_t, sq_c = (None, None) if metric == "bernoulli" else (float(t @ t), float(c @ c))
    vt = float(arm_variance(nt, t.sum(), sq_t, metric))
    vc = float(arm_variance(nc, c.sum(), sq_c, metric))
    variance = vt / nt + vc / nc
    tau2 = (mde if mde is not None else DEFAULT_MDE_IN_SD * math.sqrt((vt + vc) / 2)) ** 2
    if tau2 == 0:  # no mde and both arms constant: no scale to tune the mixture to
        return result(-math.inf, math.inf, 1.0)
    if variance == 0:  # both arms constant: the difference is known exactly
        return result(d, d, P_FLOOR if d else 1.0)
    half, log_lr = bounds(d, variance, tau2, alpha, final=final)
    if final:
        p = _last_look_p(d / math.sqrt(variance), tau2 / variance)
    else:
        p = max(P_FLOOR, min(1.0, math.exp(-float(log_lr))))
    h = float(half)
    return result(d - h, d + h, p)
