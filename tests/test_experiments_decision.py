"""The canary verdict: each rule of `decide` in its order, and whole simulated canaries driven
look by look through `sequential_test` and `decide`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stagegate.experiments.decision import Decision, GuardrailCheck, decide
from stagegate.experiments.sequential import SequentialResult, sequential_test

LIMITS = {"min_samples": 1000, "max_samples": 20_000, "elapsed_s": 600.0, "max_duration_s": 3600.0}


def _result(lower: float, upper: float, n: int = 5000) -> SequentialResult:
    return SequentialResult(
        metric="continuous",
        n_treatment=n,
        n_control=n + 3,
        mean_treatment=1.0 + (lower + upper) / 2,
        mean_control=1.0,
        estimate=(lower + upper) / 2,
        lower=lower,
        upper=upper,
        p_value=0.5,
    )


def _decide(
    primary: SequentialResult, guardrails: list[GuardrailCheck] | None = None, **kw: object
) -> Decision:
    return decide(primary, guardrails or [], **(LIMITS | kw))  # type: ignore[arg-type]


def test_a_breached_guardrail_rolls_back_at_any_look() -> None:
    latency = GuardrailCheck("latency_ms", _result(12.0, 30.0, n=50), max_increase=10.0)
    errors = GuardrailCheck("error_rate", _result(-0.001, 0.002, n=50), max_increase=0.001)
    # Before the minimum sample, and with the primary metric winning: the guardrail decides.
    decision = _decide(_result(0.1, 0.3, n=50), [latency, errors])
    assert decision.action == "rollback"
    assert decision.breached == ("latency_ms",)
    assert "latency_ms" in decision.reason
    assert "10" in decision.reason


def test_a_guardrail_within_its_allowance_does_not_block() -> None:
    ok = GuardrailCheck("error_rate", _result(0.0005, 0.004), max_increase=0.001)
    assert _decide(_result(0.02, 0.05), [ok]).action == "promote"


def test_the_minimum_sample_holds_a_verdict_back() -> None:
    decision = _decide(_result(0.1, 0.3, n=400))
    assert decision.action == "continue"
    assert "400 of 1000" in decision.reason


@pytest.mark.parametrize(
    ("lower", "upper", "higher_is_better", "min_effect", "action"),
    [
        (0.01, 0.05, True, 0.0, "promote"),
        (0.01, 0.05, True, 0.02, "continue"),  # not yet beyond the minimum effect
        (-0.05, -0.01, True, 0.0, "rollback"),  # proven worse
        (-0.05, -0.01, False, 0.0, "promote"),  # lower is better: a drop wins
        (-0.05, -0.03, False, 0.02, "promote"),
        (0.01, 0.05, False, 0.0, "rollback"),
        (-0.01, 0.02, True, 0.0, "continue"),
    ],
)
def test_win_worse_or_wait(
    lower: float, upper: float, higher_is_better: bool, min_effect: float, action: str
) -> None:
    decision = _decide(
        _result(lower, upper), min_effect=min_effect, higher_is_better=higher_is_better
    )
    assert decision.action == action
    assert decision.breached == ()


def test_limits_end_an_inconclusive_canary() -> None:
    at_max = _decide(_result(-0.01, 0.02, n=20_000))
    assert at_max.action == "rollback"
    assert "Inconclusive" in at_max.reason
    assert "20000 per arm" in at_max.reason
    out_of_time = _decide(_result(-0.01, 0.02, n=300), elapsed_s=3600.0)
    assert out_of_time.action == "rollback"
    assert "3600 s" in out_of_time.reason
    # A win at the limit is still a win.
    assert _decide(_result(0.01, 0.02, n=20_000)).action == "promote"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"min_samples": -1}, "min_samples"),
        ({"max_samples": 10}, "max_samples"),
        ({"max_duration_s": 0.0}, "max_duration_s"),
        ({"elapsed_s": math.nan}, "elapsed_s"),
        ({"min_effect": -0.1}, "min_effect"),
    ],
)
def test_bad_limits_are_refused(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _decide(_result(0.0, 1.0), **kw)


def test_repeated_or_negative_guardrails_are_refused() -> None:
    g = GuardrailCheck("error_rate", _result(0.0, 0.1), max_increase=0.01)
    with pytest.raises(ValueError, match="repeat"):
        _decide(_result(0.0, 1.0), [g, g])
    with pytest.raises(ValueError, match="max_increase"):
        _decide(_result(0.0, 1.0), [GuardrailCheck("x", _result(0.0, 0.1), -1.0)])


def _canary(lift: float, latency_lift: float, seed: int) -> tuple[Decision, int]:
    """A simulated canary: a look every 400 units per arm, conversion as the primary metric,
    latency (log-normal, ms) as a guardrail allowed +5 ms. Returns the verdict and the look."""
    rng = np.random.default_rng(seed)
    n_max = 24_000
    conv_t, conv_c = rng.binomial(1, 0.10 + lift, n_max), rng.binomial(1, 0.10, n_max)
    lat_t = rng.lognormal(math.log(80), 0.6, n_max) + latency_lift
    lat_c = rng.lognormal(math.log(80), 0.6, n_max)
    for look, n in enumerate(range(400, n_max + 1, 400)):
        primary = sequential_test(conv_t[:n], conv_c[:n], metric="bernoulli", max_samples=n_max)
        latency = sequential_test(lat_t[:n], lat_c[:n], mde=5.0)
        decision = decide(
            primary,
            [GuardrailCheck("latency_ms", latency, max_increase=5.0)],
            min_samples=2000,
            max_samples=n_max,
            elapsed_s=5.0 * look,
            max_duration_s=3600.0,
        )
        if decision.action != "continue":
            return decision, n
    raise AssertionError("the canary never ended")


def test_a_simulated_canary_that_wins_is_promoted_early() -> None:
    decision, n = _canary(lift=0.02, latency_lift=0.0, seed=1)
    assert decision.action == "promote"
    assert n < 24_000


def test_a_simulated_slow_canary_is_rolled_back_by_its_guardrail() -> None:
    decision, n = _canary(lift=0.02, latency_lift=40.0, seed=2)
    assert decision.action == "rollback"
    assert decision.breached == ("latency_ms",)
    assert n <= 2000  # the guardrail acts before the minimum sample
