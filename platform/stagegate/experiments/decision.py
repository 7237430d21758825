# TEMPORARY stand-in (not to be committed): the helper's module replaces it.
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from stagegate.experiments.sequential import SequentialResult

Action = Literal["promote", "rollback", "continue"]


@dataclass(frozen=True)
class GuardrailCheck:
    name: str
    result: SequentialResult
    max_increase: float


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    breached: tuple[str, ...]


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
    breached = tuple(g.name for g in guardrails if g.result.lower > g.max_increase)
    if breached:
        return Decision("rollback", f"guardrail breached: {breached}", breached)
    n = min(primary.n_treatment, primary.n_control)
    if n < min_samples:
        return Decision("continue", f"{n} of {min_samples}", ())
    win = primary.lower > min_effect if higher_is_better else primary.upper < -min_effect
    if win:
        return Decision(
            "promote",
            f"won {primary.estimate:+.3f} [{primary.lower:+.3f}, {primary.upper:+.3f}]",
            (),
        )
    lose = primary.upper < 0 if higher_is_better else primary.lower > 0
    if lose:
        return Decision("rollback", "worse", ())
    if n >= max_samples or elapsed_s >= max_duration_s:
        return Decision("rollback", "inconclusive", ())
    return Decision("continue", "continue", ())
