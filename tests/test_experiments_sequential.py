"""The sequential A/B test: its statistic and boundaries against closed forms computed here with
scipy and statsmodels, the crossing integrator against exact Brownian-motion results, and its
validity under random look schedules (hypothesis draws the schedules, numpy the data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from statsmodels.stats.power import NormalIndPower

from stagegate.experiments import sequential as sq
from stagegate.experiments.sequential import SequentialResult, sequential_test

ALPHA = 0.05


def _lr_closed_form(d: float, v: float, tau2: float) -> float:
    # Mixture over theta ~ N(0, tau^2) of N(d; theta, V), over N(d; 0, V).
    return float(stats.norm.pdf(d, 0, math.sqrt(v + tau2)) / stats.norm.pdf(d, 0, math.sqrt(v)))


# --- the mixture statistic and its boundary ------------------------------------------------


@pytest.mark.parametrize(
    ("d", "v", "tau2"), [(0.0, 1.0, 1.0), (0.3, 0.01, 0.04), (-2e-3, 1e-6, 2.5e-5)]
)
def test_mixture_lr_is_the_normal_mixture(d: float, v: float, tau2: float) -> None:
    assert math.exp(float(sq.mixture_log_lr(d, v, tau2))) == pytest.approx(
        _lr_closed_form(d, v, tau2), rel=1e-10
    )


def test_untruncated_p_value_and_interval_against_the_closed_form() -> None:
    rng = np.random.default_rng(1)
    t, c = rng.normal(10.3, 2.0, 900), rng.normal(10.0, 2.5, 1100)
    result = sequential_test(t, c, mde=0.25, alpha=ALPHA)
    d = t.mean() - c.mean()
    v = t.var(ddof=1) / t.size + c.var(ddof=1) / c.size
    assert result.estimate == pytest.approx(d)
    assert result.p_value == pytest.approx(min(1.0, 1 / _lr_closed_form(d, v, 0.25**2)), rel=1e-9)
    # The interval's ends are where the mixture LR for "the difference is theta" is 1/alpha.
    for end in (result.lower, result.upper):
        assert _lr_closed_form(d - end, v, 0.25**2) == pytest.approx(1 / ALPHA, rel=1e-9)


def test_bernoulli_uses_the_regularised_variance() -> None:
    t = np.r_[np.ones(30), np.zeros(970)]
    c = np.r_[np.ones(50), np.zeros(950)]
    result = sequential_test(t, c, metric="bernoulli", mde=0.01)
    pt, pc = 31 / 1002, 51 / 1002  # (successes + 1) / (n + 2)
    v = pt * (1 - pt) / 1000 + pc * (1 - pc) / 1000
    assert result.p_value == pytest.approx(1 / _lr_closed_form(-0.02, v, 1e-4), rel=1e-9)
    # No conversion in either arm still gives a finite variance, hence a finite interval.
    none = sequential_test(np.zeros(100), np.zeros(100), metric="bernoulli", mde=0.01)
    assert math.isfinite(none.lower)
    assert none.lower < 0 < none.upper
    assert none.p_value == 1.0


def test_halfwidth_grows_with_the_variance() -> None:
    v = np.geomspace(1e-8, 1e2, 200)
    half = sq.mixture_halfwidth(v, 0.01, ALPHA)
    assert np.all(np.diff(half) > 0)


def test_fixed_horizon_sample_matches_statsmodels() -> None:
    p, delta = 0.05, 0.005
    v1, v2 = (p + delta) * (1 - p - delta), p * (1 - p)
    ours = sq.fixed_horizon_samples(delta, v1, v2, alpha=0.05, power=0.8)
    effect = delta / math.sqrt((v1 + v2) / 2)
    theirs = NormalIndPower().solve_power(effect_size=effect, alpha=0.05, power=0.8, ratio=1.0)
    # statsmodels counts the far tail's sliver of power too, so it may need a unit less.
    assert ours - 1 <= theirs <= ours


# --- the crossing integrator against exact results -----------------------------------------


def _two_sided_constant(b: float) -> float:
    """P(max over [0, 1] of |W| >= b), by the alternating reflection series."""
    k = np.arange(-20, 21)
    inside = np.sum(
        (-1.0) ** k * (stats.norm.cdf((2 * k + 1) * b) - stats.norm.cdf((2 * k - 1) * b))
    )
    return float(1 - inside)


@pytest.mark.parametrize("b", [1.5, 2.5, 3.2])
def test_continuous_crossing_of_a_constant_boundary(b: float) -> None:
    got = sq.crossing(lambda t: np.full_like(t, b)).probability
    assert got == pytest.approx(_two_sided_constant(b), abs=2e-5)


def test_continuous_crossing_with_drift() -> None:
    # One-sided first passage of W + mu t through +-b by t = 1 (closed form), the two sides
    # added: a path touching both within [0, 1] is far rarer than the tolerance.
    b, mu = 3.0, 1.0

    def one_side(level: float, drift: float) -> float:
        return float(
            stats.norm.sf(level - drift)
            + math.exp(2 * drift * level) * stats.norm.cdf(-level - drift)
        )

    expected = one_side(b, mu) + one_side(b, -mu)
    got = sq.crossing(lambda t: np.full_like(t, b), drift=mu).probability
    assert got == pytest.approx(expected, abs=1e-4)


def test_discrete_looks_against_the_multivariate_normal() -> None:
    # O'Brien-Fleming with 5 looks: |Z_k| >= C sqrt(5/k); C = 2.040 gives alpha = 0.05.
    times = np.arange(1, 6) / 5
    c = 2.040
    got = sq.crossing(lambda t: np.full_like(t, c), times, continuous=False).probability
    cov = np.sqrt(np.minimum.outer(times, times) / np.maximum.outer(times, times))
    limits = c * np.sqrt(5 / np.arange(1, 6))
    inside = stats.multivariate_normal(np.zeros(5), cov).cdf(limits, lower_limit=-limits)
    assert got == pytest.approx(1 - inside, abs=5e-4)
    assert got == pytest.approx(0.05, abs=5e-4)


def test_crossing_rejects_bad_times() -> None:
    with pytest.raises(ValueError, match="increase"):
        sq.crossing(lambda t: t + 1, [0.5, 0.4])
    with pytest.raises(ValueError, match="odd"):
        sq.crossing(lambda t: t + 1, points=100)


# --- the truncated design ------------------------------------------------------------------


def test_truncated_design_spends_alpha_between_early_looks_and_the_last() -> None:
    design = sq.truncated_design(ALPHA)
    assert design.early_crossing == pytest.approx(sq.EARLY_SHARE * ALPHA, rel=0.02)
    # The last look has less than alpha, more than alpha minus the early share.
    assert stats.norm.isf(ALPHA / 2) < design.critical_value
    assert design.critical_value < stats.norm.isf((ALPHA - design.early_crossing) / 2)
    # A smaller alpha is a stricter design throughout.
    strict = sq.truncated_design(0.01)
    assert strict.early_alpha < design.early_alpha
    assert strict.critical_value > design.critical_value


def test_truncated_design_by_monte_carlo() -> None:
    """Brownian paths watched at 1000 looks: the design rejects about alpha of them, no more."""
    rng = np.random.default_rng(7)
    looks, paths = 1000, 10_000
    design = sq.truncated_design(ALPHA)
    t = np.arange(1, looks + 1) / looks
    w = np.cumsum(rng.normal(0, math.sqrt(1 / looks), (paths, looks)), axis=1, dtype=np.float32)
    z = np.abs(w[:, :-1]) / np.sqrt(t[:-1])
    # In z: the early mSPRT boundary with tau^2 = rho x the final variance, information t.
    r = sq.TRUNCATED_RHO * t[:-1]
    early = np.sqrt((1 + r) / r * (np.log1p(r) + 2 * math.log(1 / design.early_alpha)))
    rejected = (z >= early).any(axis=1) | (np.abs(w[:, -1]) >= design.critical_value)
    se = math.sqrt(ALPHA * (1 - ALPHA) / paths)
    assert rejected.mean() <= ALPHA + 3 * se
    assert rejected.mean() >= ALPHA - 6 * se  # 1000 looks come close to continuous monitoring


def test_p_values_agree_with_the_design() -> None:
    design = sq.truncated_design(ALPHA)
    assert sq.final_p_value(design.critical_value) == pytest.approx(ALPHA, rel=1e-3)
    ps = [sq.final_p_value(z) for z in (0.5, 2.5, 4.0)]
    assert ps[0] == 1.0
    assert ALPHA > ps[1] > ps[2]
    assert ps[2] < 1e-3
    early = sq.early_p_value(math.log(1 / design.early_alpha))
    assert early == pytest.approx(ALPHA, rel=1e-6)
    assert sq.early_p_value(0.0) == 1.0
    assert sq.early_p_value(100.0) == sq.P_FLOOR


# --- sequential_test at a look -------------------------------------------------------------


def test_truncation_ignores_units_past_the_maximum_and_marks_the_last_look() -> None:
    rng = np.random.default_rng(3)
    t, c = rng.binomial(1, 0.12, 700), rng.binomial(1, 0.10, 650)
    early = sequential_test(t[:400], c, metric="bernoulli", max_samples=500)
    assert (early.n_treatment, early.n_control, early.final_look) == (400, 500, False)
    last = sequential_test(t, c, metric="bernoulli", max_samples=500)
    same = sequential_test(t[:500], c[:500], metric="bernoulli", max_samples=500)
    assert last == same
    assert last.final_look
    assert (last.n_treatment, last.n_control) == (500, 500)
    z = last.estimate / ((last.upper - last.estimate) / sq.truncated_design(ALPHA).critical_value)
    assert last.p_value == pytest.approx(sq.final_p_value(z), rel=1e-6)


@pytest.mark.parametrize("arms", [([], []), ([1.0], [2.0, 3.0]), ([1.0, 2.0], [])])
def test_tiny_arms_give_an_infinite_interval(arms: tuple[list[float], list[float]]) -> None:
    result = sequential_test(*arms)
    assert (result.lower, result.upper, result.p_value) == (-math.inf, math.inf, 1.0)
    assert result.to_dict()["n_treatment"] == len(arms[0])


def test_constant_arms_know_the_difference() -> None:
    result = sequential_test(np.full(10, 3.0), np.full(12, 1.0))
    assert (result.lower, result.upper) == (2.0, 2.0)
    assert result.p_value == sq.P_FLOOR
    assert sequential_test(np.ones(5), np.ones(5)).p_value == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"treatment": [0, 1, 2], "metric": "bernoulli"}, "only 0 and 1"),
        ({"treatment": [1.0, math.nan]}, "NaN"),
        ({"treatment": [[1.0, 2.0]]}, "one-dimensional"),
        ({"alpha": 1.5}, "alpha"),
        ({"mde": -1.0}, "mde"),
        ({"max_samples": 1}, "max_samples"),
        ({"metric": "poisson"}, "metric"),
    ],
)
def test_bad_input_is_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"treatment": [0.0, 1.0, 1.0], "control": [0.0, 1.0]} | kwargs
    with pytest.raises(ValueError, match=message):
        sequential_test(**args)  # type: ignore[arg-type]


def test_to_dict_is_flat() -> None:
    result = sequential_test([1.0, 2.0, 3.0], [1.0, 1.5, 2.5], max_samples=10)
    out = result.to_dict()
    assert (out["final_look"], out["max_samples"], out["metric"]) == (0, 10, "continuous")
    assert set(out) >= {"estimate", "lower", "upper", "p_value", "n_treatment", "n_control"}


# --- properties ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(20, 3000),
    shift=st.floats(-1.0, 1.0),
    scale=st.floats(0.1, 10.0),
    truncated=st.booleans(),
)
def test_interval_contains_the_estimate_and_p_matches_it(
    seed: int, n: int, shift: float, scale: float, truncated: bool
) -> None:
    rng = np.random.default_rng(seed)
    t, c = rng.normal(shift, scale, n), rng.normal(0, scale, n + 7)
    result = sequential_test(t, c, mde=0.2 * scale, max_samples=4000 if truncated else None)
    assert result.lower <= result.estimate <= result.upper
    assert 0 < result.p_value <= 1
    # Rejecting "no difference" and the interval leaving 0 are one event.
    assert (result.p_value <= ALPHA) == result.rejects or min(
        abs(result.lower), abs(result.upper)
    ) < 1e-9 * scale


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), truncated=st.booleans())
def test_interval_narrows_as_units_arrive(seed: int, truncated: bool) -> None:
    rng = np.random.default_rng(seed)
    t, c = rng.lognormal(0, 0.5, 8000), rng.lognormal(0, 0.5, 8000)
    widths = [
        (r.upper - r.lower)
        for n in (250, 1000, 4000)
        for r in [sequential_test(t[:n], c[:n], mde=0.05, max_samples=9000 if truncated else None)]
    ]
    assert widths[0] > widths[1] > widths[2]


def _h0_rejection_rate(
    schedule: list[int], metric: str, truncated: bool, sims: int, seed: int
) -> float:
    """Share of simulated A/A tests that ever reject at these looks (per-arm counts), using
    the library's vectorised core; the last look is at the maximum when truncated."""
    rng = np.random.default_rng(seed)
    counts = np.array(schedule, dtype=np.float64)
    steps = np.diff(counts, prepend=0).astype(np.int64)
    arms = []
    for _ in range(2):
        if metric == "bernoulli":
            s = np.cumsum(rng.binomial(steps, 0.3, (sims, steps.size)), axis=1)
            v = sq.arm_variance(counts, s, None, "bernoulli")
        else:
            s = np.cumsum(rng.normal(0, np.sqrt(steps), (sims, steps.size)), axis=1)
            ss = np.cumsum(rng.chisquare(steps, (sims, steps.size)), axis=1)
            v = sq.arm_variance(counts, s, ss, "continuous")
        arms.append((s / counts, v))
    (mt, vt), (mc, vc) = arms
    d, variance = mt - mc, vt / counts + vc / counts
    if truncated:
        half = sq.halfwidth(
            variance,
            alpha=ALPHA,
            final_variance=(vt + vc) / counts[-1],
            final=counts == counts[-1],
        )
    else:
        half = sq.halfwidth(variance, alpha=ALPHA, tau2=0.1**2)
    return float((np.abs(d) > half).any(axis=1).mean())


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    looks=st.lists(st.integers(50, 20_000), min_size=1, max_size=60, unique=True),
    metric=st.sampled_from(["bernoulli", "continuous"]),
    truncated=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_type_one_error_under_any_look_schedule(
    looks: list[int], metric: str, truncated: bool, seed: int
) -> None:
    """Hypothesis draws the look schedule (per-arm counts at each look): few or many looks,
    bunched or spread. Under no difference the test rejects at most alpha of the time."""
    sims = 4000
    schedule = sorted(looks)
    if truncated:
        schedule.append(schedule[-1] + 100)  # the last look: both arms at the maximum
    rate = _h0_rejection_rate(schedule, metric, truncated, sims, seed)
    assert rate <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / sims)


def test_type_one_error_when_looking_very_often() -> None:
    # A look every 25 units, 800 looks; a naive z-test on the same looks for contrast.
    sims = 2000
    schedule = list(range(25, 20_001, 25))
    rate = _h0_rejection_rate(schedule, "continuous", True, sims, 11)
    assert rate <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / sims)
    rng = np.random.default_rng(11)
    steps = np.diff(np.array(schedule), prepend=0)
    walk = np.cumsum(rng.normal(0, np.sqrt(2 * steps), (sims, steps.size)), axis=1)
    naive = (np.abs(walk) / np.sqrt(2 * np.array(schedule)) > 1.96).any(axis=1).mean()
    assert naive > 3 * ALPHA  # peeking with a fixed-horizon test is badly invalid


def test_result_fields_keep_the_interface() -> None:
    fields = set(SequentialResult.__dataclass_fields__)
    assert fields >= {
        "metric",
        "n_treatment",
        "n_control",
        "mean_treatment",
        "mean_control",
        "estimate",
        "lower",
        "upper",
        "p_value",
    }
