"""Off-policy estimates of a candidate's reward from the champion's logs, and the gate on them.

The champion (the logging policy) records, per request, the action it took and its propensity;
feedback labels give the reward. The candidate scores the same contexts in batch, which gives
its probability of every action. IPS, SNIPS and doubly robust (DR) then estimate the reward the
candidate would have earned, each with an interval and the effective sample size.

Conventions match Open Bandit Pipeline (`obp.ope`) with one slot (`position` 0): the importance
weight is w = pi_e(a_i | x_i) / p_i, IPS is mean(w r), SNIPS is sum(w r) / sum(w), and DR is
mean(sum_a pi_e(a | x_i) q(x_i, a) + w (r - q(x_i, a_i))). `benchmarks/ope.py` checks that the
point estimates agree with obp's to 1e-9.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import special  # type: ignore[import-untyped]

Method = Literal["ips", "snips", "dr"]
IntervalMethod = Literal["analytic", "bootstrap"]
Verdict = Literal["pass", "fail", "insufficient_data"]

FloatArray = npt.NDArray[np.float64]
# Rows of a policy's action distribution may sum to 1 within this (float32 softmax output).
SUM_TOLERANCE = 1e-6
# Bootstrap replicates are drawn in blocks of at most this many indices, to bound memory.
BOOTSTRAP_BLOCK = 4_000_000


@dataclass(frozen=True, slots=True)
class OffPolicyEstimate:
    """One policy-value estimate with its (1 - alpha) two-sided interval.

    `ess` is Kish's effective sample size of the importance weights, (sum w)^2 / sum w^2: the
    number of on-policy rows the estimate is worth. Far below `n`, the weights are degenerate
    and the interval is not to be trusted, whatever its width. `max_weight` says the same from
    the other side. For an on-policy mean (`method` "on_policy") every weight is 1.
    """

    method: str
    value: float
    lower: float
    upper: float
    std_error: float
    ess: float
    n: int
    alpha: float
    interval: IntervalMethod
    max_weight: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Influence:
    """A point estimate and its per-row influence values (mean zero), the analytic interval's
    and the paired gate's common currency. `numerator`/`denominator` rebuild the estimate on
    resampled rows: value = sum(numerator) / sum(denominator), a denominator of None being
    all ones (a plain mean)."""

    method: Method
    value: float
    influence: FloatArray
    numerator: FloatArray
    denominator: FloatArray | None
    weights: FloatArray


# --- validation ----------------------------------------------------------------------------


def _vector(name: str, values: npt.ArrayLike) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not _all_finite(array):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"{name} must be finite; row {bad} is {array[bad]}")
    return array


def _same_length(**arrays: npt.NDArray[Any]) -> int:
    lengths = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs differ in length: {lengths}")
    return int(next(iter(lengths.values())))


def _check_propensities(propensities: FloatArray) -> None:
    bad = (propensities <= 0) | (propensities > 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"propensities must lie in (0, 1]; row {row} is {propensities[row]} "
            f"({int(bad.sum())} such rows). Drop rows without a valid propensity first "
            "(counterfactual_gate does that and counts them)"
        )


def _all_finite(array: npt.NDArray[np.float64]) -> bool:
    # min and max propagate NaN and show infinities, in two passes and no temporary array:
    # this check runs on every (n, K) input, and a million rows must take well under a second.
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))


def _check_probabilities(name: str, probabilities: npt.NDArray[np.float64]) -> None:
    if probabilities.min() < 0 or probabilities.max() > 1:
        raise ValueError(f"{name} must lie in [0, 1]")


def _actions(actions: npt.ArrayLike, n_actions: int) -> npt.NDArray[np.intp]:
    array = np.asarray(actions)
    if array.ndim != 1:
        raise ValueError(f"actions must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        as_float = np.asarray(array, dtype=np.float64)
        if not (np.isfinite(as_float).all() and (as_float == np.round(as_float)).all()):
            raise ValueError("actions must be integers (action indices)")
        array = as_float
    out = array.astype(np.intp, copy=False)
    if out.size and (out.min() < 0 or out.max() >= n_actions):
        raise ValueError(
            f"actions must be indices in [0, {n_actions}); got {out.min()}..{out.max()}"
        )
    return out


def _matrix(name: str, values: npt.ArrayLike, n: int, *, check_finite: bool = True) -> FloatArray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (n, n_actions), got {array.shape}")
    if array.shape[0] != n:
        raise ValueError(f"{name} has {array.shape[0]} rows, the rewards {n}")
    if array.shape[1] == 0:
        raise ValueError(f"{name} has no actions")
    if check_finite and not _all_finite(array):
        raise ValueError(f"{name} must be finite")
    return array


def _distribution(values: npt.ArrayLike, n: int) -> FloatArray:
    """The candidate's action distribution (n, K): in [0, 1], each row summing to 1."""
    dist = _matrix("action_dist", values, n, check_finite=False)
    low, high = dist.min(), dist.max()
    if not (low >= 0 and high <= 1):  # also catches NaN, which fails every comparison
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError("action_dist must be finite")
        raise ValueError("action_dist must lie in [0, 1]")
    # einsum sums the short rows several times faster than dist.sum(axis=1).
    if np.abs(np.einsum("ij->i", dist) - 1).max() > SUM_TOLERANCE:
        raise ValueError("every row of action_dist must sum to 1 (a probability distribution)")
    return dist


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


# --- the estimators' influence values --------------------------------------------------------


def _ips(rewards: FloatArray, weights: FloatArray) -> _Influence:
    contributions = weights * rewards
    value = float(contributions.mean())
    return _Influence("ips", value, contributions - value, contributions, None, weights)


def _snips(rewards: FloatArray, weights: FloatArray) -> _Influence:
    mean_weight = float(weights.mean())
    if mean_weight <= 0:
        raise ValueError(
            "SNIPS is undefined: the candidate gives every logged action probability 0"
        )
    numerator = weights * rewards
    value = float(numerator.sum() / weights.sum())
    # Delta method for a ratio of means: the influence of sum(w r)/sum(w) is w (r - V) / mean(w).
    influence = weights * (rewards - value) / mean_weight
    return _Influence("snips", value, influence, numerator, weights, weights)


def _dr(
    rewards: FloatArray,
    weights: FloatArray,
    actions: npt.NDArray[np.intp],
    action_dist: FloatArray,
    q_hat: FloatArray,
) -> _Influence:
    rows = np.arange(rewards.shape[0])
    direct = np.einsum("ij,ij->i", action_dist, q_hat)
    contributions = direct + weights * (rewards - q_hat[rows, actions])
    value = float(contributions.mean())
    return _Influence("dr", value, contributions - value, contributions, None, weights)


# --- intervals -------------------------------------------------------------------------------


def _t_quantile(probability: float, df: int) -> float:
    """Student's t quantile, as scipy.stats.t.ppf, without its millisecond of dispatch."""
    return float(special.stdtrit(df, probability))


def _std_error(influence: FloatArray) -> float:
    n = influence.shape[0]
    if n < 2:
        return math.nan
    return float(np.sqrt(np.dot(influence, influence) / (n - 1) / n))


def _bootstrap_replicates(
    numerator: FloatArray,
    denominator: FloatArray | None,
    baseline: FloatArray | None,
    n_bootstrap: int,
    seed: int | None,
) -> FloatArray:
    """sum(num[idx]) / sum(den[idx]) (- mean(baseline[idx])) over resampled rows, in blocks."""
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")
    n = numerator.shape[0]
    rng = np.random.default_rng(seed)
    out = np.empty(n_bootstrap)
    block = max(1, BOOTSTRAP_BLOCK // n)
    # int32 indices gather faster than int64 and halve the block's memory.
    index_type = np.int32 if n < 2**31 else np.int64
    for start in range(0, n_bootstrap, block):
        stop = min(n_bootstrap, start + block)
        index = rng.integers(0, n, size=(stop - start, n), dtype=index_type)
        replicate = numerator[index].sum(axis=1)
        replicate /= n if denominator is None else denominator[index].sum(axis=1)
        if baseline is not None:
            replicate -= baseline[index].mean(axis=1)
        out[start:stop] = replicate
    return out


def _estimate(
    fit: _Influence,
    alpha: float,
    interval: IntervalMethod,
    n_bootstrap: int,
    seed: int | None,
) -> OffPolicyEstimate:
    _check_alpha(alpha)
    n = fit.influence.shape[0]
    se = _std_error(fit.influence)
    if interval == "analytic":
        half = _t_quantile(1 - alpha / 2, n - 1) * se if n > 1 else math.nan
        lower, upper = fit.value - half, fit.value + half
    elif interval == "bootstrap":
        replicates = _bootstrap_replicates(fit.numerator, fit.denominator, None, n_bootstrap, seed)
        lower_q, upper_q = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
        lower, upper = float(lower_q), float(upper_q)
    else:
        raise ValueError(f"interval must be 'analytic' or 'bootstrap', got {interval!r}")
    w = fit.weights
    ess = float(w.sum() ** 2 / np.dot(w, w)) if w.any() else 0.0
    return OffPolicyEstimate(
        method=fit.method,
        value=fit.value,
        lower=lower,
        upper=upper,
        std_error=se,
        ess=ess,
        n=n,
        alpha=alpha,
        interval=interval,
        max_weight=float(w.max()),
    )


# --- public estimators -----------------------------------------------------------------------


def importance_weights(propensities: npt.ArrayLike, target_probs: npt.ArrayLike) -> FloatArray:
    """w_i = pi_e(a_i | x_i) / p_i, after checking both (the same length, finite, in range)."""
    p = _vector("propensities", propensities)
    target = _vector("target_probs", target_probs)
    _same_length(propensities=p, target_probs=target)
    _check_propensities(p)
    _check_probabilities("target_probs", target)
    return target / p


def ips(
    rewards: npt.ArrayLike,
    propensities: npt.ArrayLike,
    target_probs: npt.ArrayLike,
    *,
    alpha: float = 0.05,
    interval: IntervalMethod = "analytic",
    n_bootstrap: int = 1000,
    seed: int | None = None,
) -> OffPolicyEstimate:
    """Inverse propensity scoring: mean(w r). Unbiased when every propensity is right.

    `target_probs` is the candidate's probability of the logged action. The analytic interval is
    Student's t on the per-row contributions w r; "bootstrap" resamples rows (percentile).
    """
    r = _vector("rewards", rewards)
    weights = importance_weights(propensities, target_probs)
    _same_length(rewards=r, weights=weights)
    return _estimate(_ips(r, weights), alpha, interval, n_bootstrap, seed)


def snips(
    rewards: npt.ArrayLike,
    propensities: npt.ArrayLike,
    target_probs: npt.ArrayLike,
    *,
    alpha: float = 0.05,
    interval: IntervalMethod = "analytic",
    n_bootstrap: int = 1000,
    seed: int | None = None,
) -> OffPolicyEstimate:
    """Self-normalised IPS: sum(w r) / sum(w). Slightly biased, much less variable than IPS.

    The analytic interval comes from the delta method for a ratio of means: the influence of
    row i is w_i (r_i - V) / mean(w).
    """
    r = _vector("rewards", rewards)
    weights = importance_weights(propensities, target_probs)
    _same_length(rewards=r, weights=weights)
    return _estimate(_snips(r, weights), alpha, interval, n_bootstrap, seed)


def _dr_inputs(
    rewards: npt.ArrayLike,
    propensities: npt.ArrayLike,
    actions: npt.ArrayLike,
    action_dist: npt.ArrayLike,
    q_hat: npt.ArrayLike,
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.intp], FloatArray, FloatArray]:
    r = _vector("rewards", rewards)
    p = _vector("propensities", propensities)
    n = _same_length(rewards=r, propensities=p, actions=np.asarray(actions))
    _check_propensities(p)
    dist = _distribution(action_dist, n)
    q = _matrix("q_hat", q_hat, n)
    if q.shape[1] != dist.shape[1]:
        raise ValueError(f"q_hat has {q.shape[1]} actions, action_dist {dist.shape[1]}")
    a = _actions(actions, dist.shape[1])
    return r, p, a, dist, q


def doubly_robust(
    rewards: npt.ArrayLike,
    propensities: npt.ArrayLike,
    actions: npt.ArrayLike,
    action_dist: npt.ArrayLike,
    q_hat: npt.ArrayLike,
    *,
    alpha: float = 0.05,
    interval: IntervalMethod = "analytic",
    n_bootstrap: int = 1000,
    seed: int | None = None,
) -> OffPolicyEstimate:
    """Doubly robust: the reward model's value of the candidate plus IPS on its residuals.

    `action_dist` (n, K) is the candidate's distribution over actions for each logged context,
    `q_hat` (n, K) the reward model's predictions (cross-fitted, see `reward_model`), `actions`
    the logged action indices. Unbiased if either the propensities or q_hat are right; the
    residuals are smaller than the rewards, so the interval is narrower than IPS's.
    """
    r, p, a, dist, q = _dr_inputs(rewards, propensities, actions, action_dist, q_hat)
    weights = dist[np.arange(r.shape[0]), a] / p
    return _estimate(_dr(r, weights, a, dist, q), alpha, interval, n_bootstrap, seed)


def on_policy(
    rewards: npt.ArrayLike,
    *,
    alpha: float = 0.05,
    interval: IntervalMethod = "analytic",
    n_bootstrap: int = 1000,
    seed: int | None = None,
) -> OffPolicyEstimate:
    """The logging policy's own reward: the mean of the logged rewards."""
    r = _vector("rewards", rewards)
    fit = _Influence("ips", float(r.mean()), r - r.mean(), r, None, np.ones_like(r))
    estimate = _estimate(fit, alpha, interval, n_bootstrap, seed)
    return OffPolicyEstimate(**{**estimate.to_dict(), "method": "on_policy"})


def policy_from_scores(scores: npt.ArrayLike, temperature: float | None = None) -> FloatArray:
    """The candidate's action distribution (n, K) from its batch scores of the logged contexts.

    `temperature` None: the candidate is deterministic and takes its top-scored action (ties
    share the probability). Otherwise a softmax of scores / temperature.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0:
        raise ValueError(f"scores must have shape (n, n_actions), got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    if temperature is None:
        top = s == s.max(axis=1, keepdims=True)
        return np.asarray(top / top.sum(axis=1, keepdims=True), dtype=np.float64)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = s / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float64)


# --- the gate --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatePolicy:
    """The policy knobs of the counterfactual gate.

    The gate passes when, at one-sided `confidence`, the candidate's reward is at least the
    champion's minus `margin` (in reward units): the lower confidence bound of the paired
    difference candidate - champion is >= -margin. Too little evidence (fewer than `min_rows`
    rows with a valid propensity, less than `min_share` of the rows, or an effective sample
    size under `min_ess`) gives "insufficient_data", which blocks promotion only if
    `block_on_insufficient_data`.
    """

    margin: float = 0.0
    confidence: float = 0.95
    min_rows: int = 1000
    min_share: float = 0.0
    min_ess: float = 0.0
    method: Method = "dr"
    interval: IntervalMethod = "analytic"
    n_bootstrap: int = 1000
    seed: int | None = 0
    block_on_insufficient_data: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be finite and >= 0, got {self.margin}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0.5, 1), got {self.confidence}")
        if self.min_rows < 2:
            raise ValueError(f"min_rows must be at least 2, got {self.min_rows}")
        if not 0 <= self.min_share <= 1:
            raise ValueError(f"min_share must lie in [0, 1], got {self.min_share}")
        if not self.min_ess >= 0:
            raise ValueError(f"min_ess must be >= 0, got {self.min_ess}")
        if self.method not in ("ips", "snips", "dr"):
            raise ValueError(f"method must be 'ips', 'snips' or 'dr', got {self.method!r}")
        if self.interval not in ("analytic", "bootstrap"):
            raise ValueError(f"interval must be 'analytic' or 'bootstrap', got {self.interval!r}")


@dataclass(frozen=True, slots=True)
class GateVerdict:
    """The gate's answer. `blocks` is what the stage transition obeys: a fail always blocks,
    insufficient data blocks if the policy says so.

    `difference` is candidate - champion on the rows used and `difference_lower` its one-sided
    lower confidence bound at `confidence`; the gate passes iff difference_lower >= -margin.
    """

    verdict: Verdict
    reason: str
    blocks: bool
    method: Method
    candidate: OffPolicyEstimate | None
    champion: OffPolicyEstimate | None
    difference: float | None
    difference_lower: float | None
    margin: float
    confidence: float
    n_rows: int
    n_used: int
    n_missing_propensity: int
    n_invalid_propensity: int

    @property
    def passed(self) -> bool:
        return not self.blocks

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        return out


def counterfactual_gate(
    rewards: npt.ArrayLike,
    propensities: npt.ArrayLike,
    actions: npt.ArrayLike,
    action_dist: npt.ArrayLike,
    q_hat: npt.ArrayLike | None = None,
    policy: GatePolicy | None = None,
) -> GateVerdict:
    """Judge a candidate against the champion that logged the rows: pass, fail or insufficient.

    `propensities` may hold NaN where the champion logged none; such rows, and rows whose
    propensity is outside (0, 1], are dropped and counted. The champion's reward is the mean
    logged reward on the rows kept, the candidate's the policy's estimator on the same rows, and
    the test is on their paired per-row difference, which is tighter than two separate intervals
    because both share the rows' noise. `q_hat` is required for DR.
    """
    policy = policy or GatePolicy()
    r = _vector("rewards", rewards)
    p_all = np.asarray(propensities, dtype=np.float64)
    if p_all.ndim != 1:
        raise ValueError(f"propensities must be one-dimensional, got shape {p_all.shape}")
    a_raw = np.asarray(actions)
    n_rows = _same_length(rewards=r, propensities=p_all, actions=a_raw)
    dist_all = _distribution(action_dist, n_rows)
    a_all = _actions(a_raw, dist_all.shape[1])
    if policy.method == "dr" and q_hat is None:
        raise ValueError("the DR gate needs q_hat (the reward model's predictions)")

    missing = np.isnan(p_all)
    invalid = ~missing & ~((p_all > 0) & (p_all <= 1))
    keep = ~(missing | invalid)
    n_used = int(keep.sum())
    n_missing, n_invalid = int(missing.sum()), int(invalid.sum())

    def answer(
        verdict: Verdict,
        reason: str,
        blocks: bool,
        candidate: OffPolicyEstimate | None = None,
        champion: OffPolicyEstimate | None = None,
        difference: float | None = None,
        difference_lower: float | None = None,
    ) -> GateVerdict:
        return GateVerdict(
            verdict=verdict,
            reason=reason,
            blocks=blocks,
            method=policy.method,
            candidate=candidate,
            champion=champion,
            difference=difference,
            difference_lower=difference_lower,
            margin=policy.margin,
            confidence=policy.confidence,
            n_rows=n_rows,
            n_used=n_used,
            n_missing_propensity=n_missing,
            n_invalid_propensity=n_invalid,
        )

    block = policy.block_on_insufficient_data
    short = _shortage(n_used, n_rows, policy)
    if short:
        return answer("insufficient_data", short + _blocking(block), block)

    r = r[keep]
    fit = _fit_kept(r, p_all[keep], a_all[keep], dist_all[keep], q_hat, keep, policy.method)

    alpha = 2 * (1 - policy.confidence)  # the two-sided interval whose lower end is one-sided
    candidate = _estimate(fit, alpha, policy.interval, policy.n_bootstrap, policy.seed)
    champion = on_policy(
        r, alpha=alpha, interval=policy.interval, n_bootstrap=policy.n_bootstrap, seed=policy.seed
    )
    difference = candidate.value - champion.value
    if policy.interval == "analytic":
        se = _std_error(fit.influence - (r - champion.value))
        lower = difference - _t_quantile(policy.confidence, n_used - 1) * se
    else:
        replicates = _bootstrap_replicates(
            fit.numerator, fit.denominator, r, policy.n_bootstrap, policy.seed
        )
        lower = float(np.quantile(replicates, 1 - policy.confidence))

    if policy.min_ess and candidate.ess < policy.min_ess:
        reason = (
            f"effective sample size {candidate.ess:.0f} < min_ess {policy.min_ess:g}: the "
            "candidate rarely takes the champion's actions"
        )
        return answer(
            "insufficient_data",
            reason + _blocking(block),
            block,
            candidate,
            champion,
            difference,
            lower,
        )
    passed = lower >= -policy.margin
    level = f"{policy.confidence:.0%}"
    reason = (
        f"{policy.method.upper()}: candidate {candidate.value:.6g} vs champion "
        f"{champion.value:.6g}; difference {difference:+.6g}, {level} lower bound {lower:+.6g} "
        f"{'>=' if passed else '<'} -margin {-policy.margin:+.6g} on {n_used} rows"
    )
    return answer(
        "pass" if passed else "fail", reason, not passed, candidate, champion, difference, lower
    )


def _fit_kept(
    r: FloatArray,
    p: FloatArray,
    a: npt.NDArray[np.intp],
    dist: FloatArray,
    q_hat: npt.ArrayLike | None,
    keep: npt.NDArray[np.bool_],
    method: Method,
) -> _Influence:
    """The candidate's estimator on the rows kept (valid propensities)."""
    weights = dist[np.arange(r.shape[0]), a] / p
    if method == "ips":
        return _ips(r, weights)
    if method == "snips":
        return _snips(r, weights)
    q = _matrix("q_hat", q_hat if q_hat is not None else (), keep.shape[0])[keep]
    if q.shape[1] != dist.shape[1]:
        raise ValueError(f"q_hat has {q.shape[1]} actions, action_dist {dist.shape[1]}")
    return _dr(r, weights, a, dist, q)


def _blocking(block: bool) -> str:
    return " (blocks by policy)" if block else " (does not block by policy)"


def _shortage(n_used: int, n_rows: int, policy: GatePolicy) -> str:
    if n_used < policy.min_rows:
        return (
            f"{n_used} of {n_rows} logged rows have a valid propensity; "
            f"min_rows is {policy.min_rows}"
        )
    if n_used < policy.min_share * n_rows:
        return (
            f"{n_used / n_rows:.1%} of {n_rows} logged rows have a valid propensity; "
            f"min_share is {policy.min_share:.1%}"
        )
    return ""
