"""Off-policy estimators, the reward model and the counterfactual gate.

Known answers come from the formulas written out here row by row, and from statsmodels, scipy
and scikit-learn where they compute the same thing; coverage from a synthetic bandit whose true
policy value is known exactly (finitely many contexts, so the truth is a finite sum).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import special, stats
from sklearn.linear_model import Ridge
from statsmodels.stats.weightstats import DescrStatsW

from stagegate.experiments.offpolicy import (
    GatePolicy,
    counterfactual_gate,
    doubly_robust,
    importance_weights,
    ips,
    on_policy,
    policy_from_scores,
    snips,
)
from stagegate.experiments.reward_model import cross_fitted_q_hat, fit_reward_model

N_ACTIONS = 4


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Bandit:
    """Logged data from a finite-context bandit: everything an estimator gets, and the truth."""

    features: np.ndarray  # (M, d): one row per context
    context: np.ndarray  # (..., n) context index of each logged row
    actions: np.ndarray
    rewards: np.ndarray
    pi_b: np.ndarray  # (M, K) the logging (champion) policy
    pi_e: np.ndarray  # (M, K) the candidate
    q: np.ndarray  # (M, K) the true expected reward
    p_context: np.ndarray

    def value(self, pi: np.ndarray) -> float:
        return float(self.p_context @ (pi * self.q).sum(axis=1))

    def row(self, i: int | tuple[()] = ()) -> tuple[np.ndarray, ...]:
        """(rewards, propensities, actions, candidate's distribution, its prob. of the action)."""
        m, a, r = self.context[i], self.actions[i], self.rewards[i]
        dist = self.pi_e[m]
        return r, self.pi_b[m, a], a, dist, dist[np.arange(a.shape[0]), a]


def bandit(reps: int, n: int, seed: int, candidate_shift: float = 0.0) -> Bandit:
    rng = np.random.default_rng(seed)
    m_count, d = 20, 3
    features = rng.normal(size=(m_count, d))
    p_context = rng.dirichlet(np.full(m_count, 5.0))
    q = special.expit(features @ rng.normal(size=(d, N_ACTIONS)) - 0.5)
    pi_b = 0.8 * _softmax(features @ rng.normal(size=(d, N_ACTIONS))) + 0.2 / N_ACTIONS
    pi_e = 0.9 * _softmax(2 * features @ rng.normal(size=(d, N_ACTIONS))) + 0.1 / N_ACTIONS
    if candidate_shift:  # move the candidate's mass towards its worst actions
        worst = _softmax(-candidate_shift * q)
        pi_e = 0.5 * pi_b + 0.5 * worst
    context = rng.choice(m_count, size=(reps, n), p=p_context)
    u = rng.random((reps, n, 1))
    actions = (u > np.cumsum(pi_b[context], axis=-1)).sum(axis=-1)
    rewards = (rng.random((reps, n)) < q[context, actions]).astype(float)
    return Bandit(features, context, actions, rewards, pi_b, pi_e, q, p_context)


@pytest.fixture(scope="module")
def logged() -> Bandit:
    return bandit(1, 3000, seed=11)


# --- known answers ---------------------------------------------------------------------------


def test_ips_is_the_mean_weighted_reward_with_a_t_interval(logged: Bandit) -> None:
    r, p, _, _, target = logged.row(0)
    estimate = ips(r, p, target, alpha=0.1)
    contributions = [target[i] / p[i] * r[i] for i in range(r.shape[0])]
    assert estimate.value == pytest.approx(math.fsum(contributions) / len(contributions), abs=1e-12)
    lower, upper = stats.t.interval(
        0.9, len(contributions) - 1, loc=np.mean(contributions), scale=stats.sem(contributions)
    )
    assert (estimate.lower, estimate.upper) == pytest.approx((lower, upper), abs=1e-12)
    lower, upper = DescrStatsW(np.array(contributions)).tconfint_mean(alpha=0.1)
    assert (estimate.lower, estimate.upper) == pytest.approx((lower, upper), abs=1e-12)
    w = target / p
    assert estimate.ess == pytest.approx(w.sum() ** 2 / (w**2).sum())
    assert 0 < estimate.ess < estimate.n == 3000
    assert estimate.max_weight == pytest.approx(w.max())


def test_snips_interval_is_the_delta_method_for_a_ratio_of_means(logged: Bandit) -> None:
    r, p, _, _, target = logged.row(0)
    estimate = snips(r, p, target)
    w = target / p
    ratio = (w * r).sum() / w.sum()
    assert estimate.value == pytest.approx(ratio, abs=1e-12)
    # Var(mean(wr) / mean(w)) ~ g' Cov g / n with g the gradient of a / b at the sample means.
    a, b = (w * r).mean(), w.mean()
    gradient = np.array([1 / b, -a / b**2])
    variance = gradient @ np.cov(np.vstack([w * r, w])) @ gradient / r.shape[0]
    assert estimate.std_error == pytest.approx(math.sqrt(variance), rel=1e-10)
    half = stats.t.ppf(0.975, r.shape[0] - 1) * math.sqrt(variance)
    assert (estimate.lower, estimate.upper) == pytest.approx((ratio - half, ratio + half))


def test_doubly_robust_is_the_direct_part_plus_weighted_residuals(logged: Bandit) -> None:
    r, p, a, dist, _ = logged.row(0)
    q_hat = np.random.default_rng(3).random((r.shape[0], N_ACTIONS))
    estimate = doubly_robust(r, p, a, dist, q_hat)
    rows = [
        sum(dist[i, k] * q_hat[i, k] for k in range(N_ACTIONS))
        + dist[i, a[i]] / p[i] * (r[i] - q_hat[i, a[i]])
        for i in range(r.shape[0])
    ]
    assert estimate.value == pytest.approx(math.fsum(rows) / len(rows), abs=1e-12)
    lower, upper = DescrStatsW(np.array(rows)).tconfint_mean(alpha=0.05)
    assert (estimate.lower, estimate.upper) == pytest.approx((lower, upper), abs=1e-12)
    # With a reward model that predicts 0 everywhere, DR is IPS.
    zero = doubly_robust(r, p, a, dist, np.zeros_like(q_hat))
    assert zero.value == pytest.approx(ips(r, p, dist[np.arange(r.shape[0]), a]).value)


def test_a_good_reward_model_narrows_the_dr_interval(logged: Bandit) -> None:
    r, p, a, dist, target = logged.row(0)
    q_hat = cross_fitted_q_hat(logged.features[logged.context[0]], a, r, N_ACTIONS)
    dr, plain = doubly_robust(r, p, a, dist, q_hat), ips(r, p, target)
    assert dr.upper - dr.lower < 0.8 * (plain.upper - plain.lower)


def test_on_policy_is_the_mean_reward_with_statsmodels_interval(logged: Bandit) -> None:
    r = logged.rewards[0]
    estimate = on_policy(r, alpha=0.01)
    assert estimate.value == pytest.approx(r.mean())
    assert (estimate.lower, estimate.upper) == pytest.approx(
        DescrStatsW(r).tconfint_mean(alpha=0.01), abs=1e-12
    )
    assert estimate.ess == pytest.approx(r.shape[0])
    assert estimate.method == "on_policy"


def test_bootstrap_interval_is_the_percentile_of_resampled_estimates(logged: Bandit) -> None:
    r, p, _, _, target = logged.row(0)
    n = r.shape[0]
    estimate = snips(r, p, target, interval="bootstrap", n_bootstrap=400, seed=5)
    index = np.random.default_rng(5).integers(0, n, size=(400, n), dtype=np.int32)
    w = target / p
    replicates = (w * r)[index].sum(axis=1) / w[index].sum(axis=1)
    expected = np.quantile(replicates, [0.025, 0.975])
    assert (estimate.lower, estimate.upper) == pytest.approx(tuple(expected), abs=1e-12)
    assert snips(r, p, target, interval="bootstrap", n_bootstrap=400, seed=5) == estimate
    analytic = snips(r, p, target)
    assert estimate.value == analytic.value
    # Same row noise, so the two intervals agree to within the bootstrap's own error.
    assert (estimate.upper - estimate.lower) == pytest.approx(
        analytic.upper - analytic.lower, rel=0.15
    )


def test_estimates_serialise_to_json(logged: Bandit) -> None:
    r, p, _, _, target = logged.row(0)
    out = json.loads(json.dumps(ips(r, p, target).to_dict()))
    assert {"method", "value", "lower", "upper", "ess", "n", "std_error"} <= set(out)
    assert out["method"] == "ips"


# --- coverage on a bandit with known truth ---------------------------------------------------


def test_95_percent_intervals_cover_the_truth_in_93_to_97_percent_of_1000_repetitions() -> None:
    sim = bandit(reps=1000, n=2000, seed=7)
    truth = sim.value(sim.pi_e)
    covered = {"ips": 0, "snips": 0, "dr": 0}
    for i in range(1000):
        r, p, a, dist, target = sim.row(i)
        q_hat = cross_fitted_q_hat(sim.features[sim.context[i]], a, r, N_ACTIONS, folds=2)
        for estimate in (
            ips(r, p, target),
            snips(r, p, target),
            doubly_robust(r, p, a, dist, q_hat),
        ):
            covered[estimate.method] += estimate.lower <= truth <= estimate.upper
    shares = {method: hits / 1000 for method, hits in covered.items()}
    assert all(0.93 <= share <= 0.97 for share in shares.values()), shares


# --- the reward model ------------------------------------------------------------------------


def test_reward_model_without_penalty_is_least_squares_per_action() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * [1.0, 10.0, 0.1] + 2
    a = rng.integers(0, 3, 500)
    r = x @ [0.5, -0.1, 3.0] + a + rng.normal(size=500)
    model = fit_reward_model(x, a, r, 3, l2=0.0)
    grid = rng.normal(size=(7, 3))
    for action in range(3):
        design = np.column_stack([np.ones((a == action).sum()), x[a == action]])
        beta = np.linalg.lstsq(design, r[a == action], rcond=None)[0]
        expected = np.column_stack([np.ones(7), grid]) @ beta
        np.testing.assert_allclose(model.predict(grid)[:, action], expected, rtol=1e-9, atol=1e-9)


def test_reward_model_ridge_matches_scikit_learn_on_standardised_features() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4)) * [1.0, 5.0, 0.2, 2.0]
    a = rng.integers(0, 2, 400)
    r = x @ [0.3, 0.1, -2.0, 0.0] + rng.normal(size=400)
    model = fit_reward_model(x, a, r, 3, l2=25.0)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    for action in range(2):
        sk = Ridge(alpha=25.0).fit(z[a == action], r[a == action])
        np.testing.assert_allclose(model.predict(x)[:, action], sk.predict(z), rtol=1e-9)
    # Action 2 was never logged: it predicts the mean reward.
    np.testing.assert_allclose(model.predict(x)[:, 2], r.mean())


def test_cross_fitting_keeps_a_rows_own_reward_out_of_its_prediction() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 2))
    a = rng.integers(0, 2, 200)
    r = rng.normal(size=200)
    before = cross_fitted_q_hat(x, a, r, 2, folds=4, seed=9)
    changed = r.copy()
    changed[17] += 100.0
    after = cross_fitted_q_hat(x, a, changed, 2, folds=4, seed=9)
    assert np.array_equal(before[17], after[17])
    assert not np.allclose(before, after)  # the other folds' models did see it


# --- the gate --------------------------------------------------------------------------------


def _gate_inputs(sim: Bandit) -> tuple[np.ndarray, ...]:
    r, p, a, dist, _ = sim.row(0)
    q_hat = cross_fitted_q_hat(sim.features[sim.context[0]], a, r, N_ACTIONS)
    return r, p, a, dist, q_hat


def test_gate_passes_a_candidate_that_is_the_champion() -> None:
    sim = bandit(1, 20_000, seed=21)
    r, p, a, _, q_hat = _gate_inputs(sim)
    same = sim.pi_b[sim.context[0]]
    verdict = counterfactual_gate(r, p, a, same, q_hat, GatePolicy(margin=0.01, min_rows=1000))
    assert verdict.verdict == "pass", verdict.reason
    assert verdict.passed
    assert not verdict.blocks
    assert verdict.difference is not None
    assert abs(verdict.difference) < 0.005  # DR's direct part adds noise of mean zero
    assert verdict.difference_lower is not None
    assert -0.01 <= verdict.difference_lower <= 0
    assert verdict.n_used == 20_000
    # Every weight is 1, so IPS's candidate is the champion row by row.
    exact = counterfactual_gate(r, p, a, same, policy=GatePolicy(method="ips", margin=0.01))
    assert exact.difference == pytest.approx(0.0, abs=1e-12)
    assert exact.verdict == "pass"


def test_gate_fails_a_worse_candidate_and_says_by_how_much() -> None:
    sim = bandit(1, 20_000, seed=22, candidate_shift=8.0)
    assert sim.value(sim.pi_e) < sim.value(sim.pi_b) - 0.03  # the truth: clearly worse
    r, p, a, dist, q_hat = _gate_inputs(sim)
    for method in ("ips", "snips", "dr"):
        verdict = counterfactual_gate(
            r,
            p,
            a,
            dist,
            q_hat,
            GatePolicy(margin=0.01, method=method),  # type: ignore[arg-type]
        )
        assert verdict.verdict == "fail", verdict.reason
        assert verdict.blocks
        assert verdict.candidate is not None
        assert verdict.candidate.method == method
        assert "lower bound" in verdict.reason
        assert verdict.difference_lower is not None
        assert verdict.difference_lower < -0.01
    # A margin wider than the loss lets the same candidate through.
    lenient = counterfactual_gate(r, p, a, dist, q_hat, GatePolicy(margin=0.5))
    assert lenient.verdict == "pass"


def test_gate_lower_bound_is_the_paired_one_sided_t_bound(logged: Bandit) -> None:
    r, p, a, dist, target = logged.row(0)
    verdict = counterfactual_gate(
        r, p, a, dist, policy=GatePolicy(method="ips", confidence=0.9, min_rows=100)
    )
    paired = target / p * r - r
    expected = paired.mean() - stats.t.ppf(0.9, r.shape[0] - 1) * stats.sem(paired)
    assert verdict.difference_lower == pytest.approx(expected, abs=1e-12)
    assert verdict.difference == pytest.approx(paired.mean(), abs=1e-12)
    assert verdict.champion is not None
    assert verdict.champion.value == pytest.approx(r.mean())


def test_gate_bootstrap_agrees_with_the_analytic_bound(logged: Bandit) -> None:
    r, p, a, dist, _ = logged.row(0)
    analytic = counterfactual_gate(r, p, a, dist, policy=GatePolicy(method="snips", min_rows=100))
    boot = counterfactual_gate(
        r, p, a, dist, policy=GatePolicy(method="snips", min_rows=100, interval="bootstrap")
    )
    assert boot.difference == analytic.difference
    assert analytic.difference_lower is not None
    assert boot.difference_lower is not None
    assert analytic.difference is not None
    gap_analytic = analytic.difference - analytic.difference_lower
    gap_boot = boot.difference - boot.difference_lower
    assert gap_boot == pytest.approx(gap_analytic, rel=0.2)


def test_gate_drops_and_counts_rows_without_a_valid_propensity(logged: Bandit) -> None:
    r, p, a, dist, target = logged.row(0)
    p = p.copy()
    p[:100] = np.nan
    p[100:110] = 0.0
    p[110:115] = 1.5
    verdict = counterfactual_gate(
        r, p, a, dist, policy=GatePolicy(method="ips", min_rows=100, margin=1.0)
    )
    assert (verdict.n_rows, verdict.n_used) == (3000, 2885)
    assert (verdict.n_missing_propensity, verdict.n_invalid_propensity) == (100, 15)
    assert verdict.candidate is not None
    assert verdict.candidate.value == pytest.approx(ips(r[115:], p[115:], target[115:]).value)


def test_too_few_propensities_is_insufficient_data_and_policy_decides_if_it_blocks(
    logged: Bandit,
) -> None:
    r, p, a, dist, _ = logged.row(0)
    p = np.where(np.arange(r.shape[0]) < 2500, np.nan, p)  # 500 rows carry a propensity
    blocking = counterfactual_gate(r, p, a, dist, policy=GatePolicy(method="ips", min_rows=1000))
    assert blocking.verdict == "insufficient_data"
    assert blocking.blocks
    assert not blocking.passed
    assert "500 of 3000" in blocking.reason
    assert blocking.candidate is None
    lenient = counterfactual_gate(
        r,
        p,
        a,
        dist,
        policy=GatePolicy(
            method="ips", min_rows=100, min_share=0.5, block_on_insufficient_data=False
        ),
    )
    assert lenient.verdict == "insufficient_data"
    assert not lenient.blocks
    assert lenient.passed
    assert "min_share" in lenient.reason
    json.dumps(lenient.to_dict())


def test_degenerate_weights_are_insufficient_data_under_min_ess(logged: Bandit) -> None:
    r, p, a, _, _ = logged.row(0)
    # A deterministic candidate that almost never agrees with the logged action.
    dist = np.zeros((r.shape[0], N_ACTIONS))
    dist[:, 3] = 1.0
    verdict = counterfactual_gate(
        r, p, a, dist, policy=GatePolicy(method="ips", min_rows=100, min_ess=2000)
    )
    assert verdict.verdict == "insufficient_data"
    assert verdict.candidate is not None
    assert verdict.candidate.ess < 2000
    assert "effective sample size" in verdict.reason


def test_policy_from_scores() -> None:
    scores = np.array([[1.0, 3.0, 3.0], [0.0, -1.0, 2.0]])
    np.testing.assert_allclose(policy_from_scores(scores), [[0, 0.5, 0.5], [0, 0, 1]])
    np.testing.assert_allclose(
        policy_from_scores(scores, temperature=0.5), special.softmax(scores / 0.5, axis=1)
    )


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewards", "propensities", "target", "message"),
    [
        ([1.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], "differ in length"),
        ([1.0, 0.0], [0.5, 0.0], [0.5, 0.5], r"propensities must lie in \(0, 1\]; row 1"),
        ([1.0, 0.0], [0.5, 1.2], [0.5, 0.5], r"propensities must lie in \(0, 1\]"),
        ([1.0, 0.0], [0.5, np.nan], [0.5, 0.5], "propensities must be finite; row 1"),
        ([np.nan, 0.0], [0.5, 0.5], [0.5, 0.5], "rewards must be finite; row 0"),
        ([1.0, 0.0], [0.5, 0.5], [0.5, 1.5], r"target_probs must lie in \[0, 1\]"),
        ([], [], [], "rewards is empty"),
        ([[1.0]], [0.5], [0.5], "one-dimensional"),
    ],
)
def test_estimators_reject_bad_input_clearly(
    rewards: list[float], propensities: list[float], target: list[float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ips(rewards, propensities, target)
    with pytest.raises(ValueError, match=message):
        snips(rewards, propensities, target)


def test_doubly_robust_rejects_bad_shapes_and_distributions() -> None:
    r, p, a = np.array([1.0, 0.0]), np.array([0.5, 0.5]), np.array([0, 1])
    dist, q = np.full((2, 2), 0.5), np.zeros((2, 2))
    with pytest.raises(ValueError, match=r"actions must be indices in \[0, 2\)"):
        doubly_robust(r, p, [0, 2], dist, q)
    with pytest.raises(ValueError, match="actions must be integers"):
        doubly_robust(r, p, [0.5, 1], dist, q)
    with pytest.raises(ValueError, match="sum to 1"):
        doubly_robust(r, p, a, np.full((2, 2), 0.4), q)
    with pytest.raises(ValueError, match="action_dist must be finite"):
        doubly_robust(r, p, a, np.array([[np.nan, 0.5], [0.5, 0.5]]), q)
    with pytest.raises(ValueError, match=r"action_dist must lie in \[0, 1\]"):
        doubly_robust(r, p, a, np.array([[1.5, -0.5], [0.5, 0.5]]), q)
    with pytest.raises(ValueError, match="q_hat has 3 actions"):
        doubly_robust(r, p, a, dist, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"action_dist must have shape \(n, n_actions\)"):
        doubly_robust(r, p, a, [0.5, 0.5], q)
    with pytest.raises(ValueError, match="q_hat must be finite"):
        doubly_robust(r, p, a, dist, np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="alpha"):
        doubly_robust(r, p, a, dist, q, alpha=1.5)
    with pytest.raises(ValueError, match="interval must be"):
        doubly_robust(r, p, a, dist, q, interval="exact")  # type: ignore[arg-type]


def test_gate_and_policy_reject_bad_input() -> None:
    r, p, a, dist = np.ones(4), np.full(4, 0.5), np.zeros(4, int), np.full((4, 2), 0.5)
    with pytest.raises(ValueError, match="needs q_hat"):
        counterfactual_gate(r, p, a, dist, policy=GatePolicy(min_rows=2))
    with pytest.raises(ValueError, match="differ in length"):
        counterfactual_gate(r, p[:3], a, dist, policy=GatePolicy(method="ips", min_rows=2))
    with pytest.raises(ValueError, match="rewards must be finite"):
        counterfactual_gate(
            np.array([1, np.nan, 0, 1]), p, a, dist, policy=GatePolicy(method="ips", min_rows=2)
        )
    for bad in ({"margin": -0.1}, {"confidence": 1.0}, {"min_rows": 1}, {"min_share": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GatePolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="folds must be at least 2"):
        cross_fitted_q_hat(np.zeros((4, 1)), a, r, 2, folds=1)
    with pytest.raises(ValueError, match="contexts have 2 features"):
        fit_reward_model(np.zeros((4, 1)), a, r, 2).predict(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="inputs differ in length"):
        fit_reward_model(np.zeros((5, 1)), a, r, 2)
    with pytest.raises(ValueError, match="propensities must lie"):
        importance_weights([0.0], [1.0])
