"""Always-valid sequential A/B test of a difference in means: a normal-mixture mSPRT, optionally
truncated at a maximum sample whose last look spends the alpha the truncation left unspent.

Why it stays valid however often the canary flow looks (docs/experiments.md has the argument):

- Untruncated (`max_samples=None`): the mixture likelihood ratio is a nonnegative martingale
  under "no difference", so by Ville's inequality P(it ever reaches 1/alpha) <= alpha, for any
  looks at any times, even looks chosen from the data.
- Truncated: before both arms reach `max_samples` an mSPRT boundary applies (tau^2 tied to
  the variance at the maximum, nominal level `early_alpha`). Its probability of being crossed
  by a Brownian path monitored continuously up to the maximum is computed exactly (numerical
  integration) and set to EARLY_SHARE of alpha; the last look, at `max_samples` per arm,
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
# The truncated design (tuned by benchmarks/ab_sequential.py, see docs/experiments.md): the
# mixing variance is TRUNCATED_RHO times the variance of the estimate at the maximum sample
# (tau = 0.67 MDE when the maximum is 1.1 times the fixed-horizon sample for that MDE), and the
# looks before the maximum may spend EARLY_SHARE of alpha under continuous monitoring.
TRUNCATED_RHO = 4.0
EARLY_SHARE = 0.6
# The smallest p-value reported, and the nominal levels over which the early crossing
# probability is tabulated (below 1e-6 the integration's rounding would show).
P_FLOOR = 1e-6
_LEVEL_GRID = np.linspace(math.log(1e-6), math.log(0.9), 28)


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


# --- the truncated design -------------------------------------------------------------------


@lru_cache(maxsize=1)
def _early_crossing() -> Callable[[ArrayLike], FloatArray]:
    """log P(the mSPRT boundary at nominal level a is crossed before the maximum), by log a.

    Continuous monitoring, rho = TRUNCATED_RHO; tabulated once (a second or a few) and
    interpolated monotonically."""
    from scipy import interpolate  # type: ignore[import-untyped]  # lazily: a 1 s import

    logs = np.array(
        [
            math.log(
                max(crossing(_mixture_boundary(TRUNCATED_RHO, math.exp(a))).probability, 1e-300)
            )
            for a in _LEVEL_GRID
        ]
    )
    if np.any(np.diff(logs) <= 0):
        raise ArithmeticError("the early crossing probability must grow with the level")
    table: Callable[[ArrayLike], FloatArray] = interpolate.PchipInterpolator(_LEVEL_GRID, logs)
    return table


def early_crossing(level: float) -> float:
    """P(|W| crosses the truncated design's mSPRT boundary at nominal `level` before the end)."""
    return math.exp(float(_early_crossing()(math.log(level))))


@dataclass(frozen=True)
class TruncatedDesign:
    """The truncated design at one alpha: the looks before the maximum use the mSPRT at
    `early_alpha`, which continuous monitoring crosses with probability EARLY_SHARE * alpha;
    the last look rejects at |z| >= `critical_value`, which makes the total alpha."""

    alpha: float
    early_alpha: float
    early_crossing: float  # computed directly at early_alpha
    critical_value: float


@lru_cache(maxsize=64)
def truncated_design(alpha: float) -> TruncatedDesign:
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    target = math.log(EARLY_SHARE * alpha)
    table = _early_crossing()
    lo, hi = float(_LEVEL_GRID[0]), float(_LEVEL_GRID[-1])
    if float(table(lo)) >= target:  # spending this little early needs a level below the grid
        raise ValueError(f"alpha {alpha} is too small for the truncated design")
    early = math.exp(_bisect(lambda a: target - float(table(a)), lo, hi, 1e-10))
    cross = crossing(_mixture_boundary(TRUNCATED_RHO, early))
    left = alpha - cross.probability
    if left <= 0:
        raise ArithmeticError(f"no alpha left for the last look (alpha={alpha})")
    c = _bisect(lambda z: cross.tail(z) - left, 0.0, float(cross.x[-1]), 1e-9)
    return TruncatedDesign(alpha, early, cross.probability, c)


def early_p_value(log_lr: float) -> float:
    """Always-valid p-value at a look before the maximum: the smallest level whose truncated
    design rejects this likelihood ratio, P(crossing at nominal 1/LR) / EARLY_SHARE."""
    level = math.exp(-log_lr) if log_lr > 0 else 1.0
    if level < math.exp(_LEVEL_GRID[0]):
        return P_FLOOR
    if level > math.exp(_LEVEL_GRID[-1]):
        return 1.0
    return min(1.0, max(P_FLOOR, early_crossing(level) / EARLY_SHARE))


def final_p_value(z: float) -> float:
    """p-value at the last look: the smallest level whose design has |z| >= critical_value.

    Searched up to 0.5 (reported as 1 above it, which is valid and conservative)."""

    def excess(log_a: float) -> float:
        return truncated_design(math.exp(log_a)).critical_value - abs(z)

    from scipy import optimize  # lazily, like interpolate

    lo, hi = math.log(P_FLOOR), math.log(0.5)
    if excess(hi) > 0:
        return 1.0
    if excess(lo) <= 0:
        return P_FLOOR
    # critical_value falls as the level grows: one root in log(level), to 1e-6 relative.
    return math.exp(float(optimize.brentq(excess, lo, hi, xtol=1e-6)))


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


def halfwidth(
    variance: ArrayLike,
    *,
    alpha: float,
    tau2: ArrayLike | None = None,
    final_variance: ArrayLike | None = None,
    final: ArrayLike = False,
) -> FloatArray:
    """Vectorised core: the half-width of the confidence sequence at each look.

    `variance` is the estimate's at this look. Untruncated: give `tau2`, the mixing variance.
    Truncated: give `final_variance`, the estimate's variance at the maximum sample (from this
    look's per-unit variances); tau^2 is TRUNCATED_RHO times it, looks before the maximum use
    the mSPRT at the design's early level, and where `final` is true (both arms at the
    maximum) the half-width is the design's critical value times the standard error."""
    v = np.asarray(variance, dtype=np.float64)
    if (tau2 is None) == (final_variance is None):
        raise ValueError("give tau2 (untruncated) or final_variance (truncated)")
    if final_variance is None:
        t2 = np.broadcast_to(np.asarray(tau2, dtype=np.float64), v.shape)
        return mixture_halfwidth(v, t2, alpha)
    design = truncated_design(alpha)
    t2 = TRUNCATED_RHO * np.broadcast_to(np.asarray(final_variance, dtype=np.float64), v.shape)
    half = mixture_halfwidth(v, t2, design.early_alpha)
    last = np.broadcast_to(np.asarray(final, dtype=bool), v.shape)
    out: FloatArray = np.where(last, design.critical_value * np.sqrt(v), half)
    return out


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


def _check_design(metric: str, alpha: float, mde: float | None, max_samples: int | None) -> None:
    if metric not in ("bernoulli", "continuous"):
        raise ValueError(f"metric must be 'bernoulli' or 'continuous', not {metric!r}")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    if mde is not None and not (math.isfinite(mde) and mde > 0):
        raise ValueError("mde must be a positive number")
    if max_samples is not None and (isinstance(max_samples, bool) or max_samples < 2):
        raise ValueError("max_samples must be an integer of at least 2")


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

    Untruncated (`max_samples=None`): the mixture is tuned to `mde`, an absolute effect
    (tau = mde), by default a tenth of the arms' standard deviation; valid at any number of
    looks, forever. Truncated: units past `max_samples` per arm are ignored, the mixture is
    tuned to the maximum sample (tau^2 = TRUNCATED_RHO x the estimate's variance there, so
    `mde` is not used: choose max_samples from it, e.g. 1.1 x fixed_horizon_samples), and the
    look where both arms have `max_samples` is the last, which spends the alpha left."""
    _check_design(metric, alpha, mde, max_samples)
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
    if metric == "bernoulli":
        vt = float(arm_variance(nt, t.sum(), None, metric))
        vc = float(arm_variance(nc, c.sum(), None, metric))
    else:  # two passes: a sum of squares would lose the digits of a large mean
        vt, vc = float(t.var(ddof=1)), float(c.var(ddof=1))
    variance = vt / nt + vc / nc
    if variance == 0:  # both arms constant: the difference is known exactly
        return result(d, d, P_FLOOR if d else 1.0)
    if max_samples is None:
        tau = mde if mde is not None else DEFAULT_MDE_IN_SD * math.sqrt((vt + vc) / 2)
        half = halfwidth(variance, alpha=alpha, tau2=tau * tau)
        p = max(P_FLOOR, min(1.0, math.exp(-float(mixture_log_lr(d, variance, tau * tau)))))
    else:
        final_variance = (vt + vc) / max_samples
        half = halfwidth(variance, alpha=alpha, final_variance=final_variance, final=final)
        if final:
            p = final_p_value(d / math.sqrt(variance))
        else:
            tau2 = TRUNCATED_RHO * final_variance
            p = early_p_value(float(mixture_log_lr(d, variance, tau2)))
    h = float(half)
    return result(d - h, d + h, p)
