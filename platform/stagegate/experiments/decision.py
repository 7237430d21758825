"""The canary's verdict at one look: promote, roll back or continue, from the primary metric's
sequential test and the guardrails' (every input is always valid, so any look may act)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from stagegate.experiments.sequential import SequentialResult

Action = Literal["promote", "rollback", "continue"]


@dataclass(frozen=True)
class GuardrailCheck:
    """A metric the canary must not make worse by more than `max_increase`."""

    name: str  # "error_rate", "latency_ms"
    result: SequentialResult  # treatment = canary, control = champion
    max_increase: float  # largest acceptable absolute increase of treatment over control


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str  # one human sentence with the figures
    breached: tuple[str, ...]  # guardrails proven worse than max_increase


def _interval(r: SequentialResult) -> str:
    return f"{r.estimate:+.4g} [{r.lower:+.4g}, {r.upper:+.4g}]"


def _check(
    guardrails: Sequence[GuardrailCheck],
    min_samples: int,
    max_samples: int,
    elapsed_s: float,
    max_duration_s: float,
    min_effect: float,
) -> None:
    if isinstance(min_samples, bool) or min_samples < 0:
        raise ValueError("min_samples must be a nonnegative integer")
    if isinstance(max_samples, bool) or max_samples < max(min_samples, 1):
        raise ValueError("max_samples must be positive and at least min_samples")
    if not (math.isfinite(max_duration_s) and max_duration_s > 0):
        raise ValueError("max_duration_s must be a positive number of seconds")
    if math.isnan(elapsed_s) or elapsed_s < 0:
        raise ValueError("elapsed_s must be a nonnegative number of seconds")
    if not (math.isfinite(min_effect) and min_effect >= 0):
        raise ValueError("min_effect must be a nonnegative number")
    names = [g.name for g in guardrails]
    if len(set(names)) != len(names):
        raise ValueError(f"guardrail names repeat: {names}")
    for g in guardrails:
        if math.isnan(g.max_increase) or g.max_increase < 0:
            raise ValueError(f"guardrail {g.name}: max_increase must be a nonnegative number")


def decide(
    primary: SequentialResult,
    guardrails: Sequence[GuardrailCheck],
    *,
    min_samples: int,
    max_samples: int,
    elapsed_s: float,
    max_duration_s: float,
    min_effect: float = 0.0,
    higher_is_better: bool = True,
) -> Decision:
    """Rules, in order:

    1. a guardrail whose lower bound exceeds its `max_increase` -> rollback, at any look;
    2. fewer than `min_samples` per arm (and time left) -> continue;
    3. a win (lower > min_effect; upper < -min_effect when lower is better) -> promote;
    4. proven worse than the champion (the interval on the wrong side of 0) -> rollback;
    5. `max_samples` per arm or `max_duration_s` reached without a win -> rollback, inconclusive;
    6. otherwise continue.
    """
    _check(guardrails, min_samples, max_samples, elapsed_s, max_duration_s, min_effect)
    breached = tuple(g.name for g in guardrails if g.result.lower > g.max_increase)
    if breached:
        worst = ", ".join(
            f"{g.name} up by {_interval(g.result)}, over the {g.max_increase:.4g} allowed"
            for g in guardrails
            if g.name in breached
        )
        return Decision("rollback", f"Guardrail breached: {worst}.", breached)

    n = min(primary.n_treatment, primary.n_control)
    out_of_time = elapsed_s >= max_duration_s
    effect = f"the effect is {_interval(primary)} after {n} units per arm"
    if n < min_samples and not out_of_time:
        return Decision(
            "continue", f"Collecting the minimum sample: {n} of {min_samples} units per arm.", ()
        )
    if higher_is_better:
        win, worse = primary.lower > min_effect, primary.upper < 0
    else:
        win, worse = primary.upper < -min_effect, primary.lower > 0
    if win:
        return Decision("promote", f"The canary wins: {effect}, beyond {min_effect:.4g}.", ())
    if worse:
        return Decision("rollback", f"The canary is worse: {effect}.", ())
    if n >= max_samples or out_of_time:
        limit = (
            f"the maximum sample of {max_samples} per arm"
            if n >= max_samples
            else f"the maximum duration of {max_duration_s:g} s"
        )
        return Decision("rollback", f"Inconclusive at {limit}: {effect}.", ())
    return Decision("continue", f"No verdict yet: {effect}.", ())
