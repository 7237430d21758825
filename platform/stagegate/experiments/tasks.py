"""Evidence per task: a multi-task model is judged task by task, not on its average.

Offline metrics named `task/<task>/<metric>` are compared with the champion's of the same name.
One task that regresses by more than its tolerance fails the whole gate, and the verdict names
it, since an average over 30 tasks hides a task that broke.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

PREFIX = "task/"
# Differences within this (relative to the metric's size) of the tolerance count as within it,
# so 0.8 - 0.7 against a tolerance of 0.1 does not fail on float rounding.
ROUNDING = 1e-12

Status = Literal["ok", "regressed", "missing", "new", "no_baseline"]


@dataclass(frozen=True, slots=True)
class TaskMetricComparison:
    """One metric of one task. `change` is the improvement (candidate - champion, negated when
    lower is better), so a regression is change < -tolerance whichever way the metric points."""

    name: str
    task: str
    metric: str
    champion: float | None
    candidate: float | None
    change: float | None
    tolerance: float
    higher_is_better: bool
    status: Status


@dataclass(frozen=True, slots=True)
class TaskVerdict:
    """`verdict` is "failed" when any task regressed beyond its tolerance or lost a metric the
    champion has; `failed_tasks` names them (sorted)."""

    verdict: Literal["passed", "failed"]
    reason: str
    failed_tasks: tuple[str, ...]
    n_tasks: int
    rows: tuple[TaskMetricComparison, ...]

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failed_tasks"] = list(self.failed_tasks)
        out["rows"] = [asdict(row) for row in self.rows]
        return out


def parse_task_metric(name: str) -> tuple[str, str] | None:
    """`task/<task>/<metric>` -> (task, metric); None for any other name. A task name may hold
    slashes (`task/ads/us/auc` is task `ads/us`); the metric is the last part."""
    if not name.startswith(PREFIX):
        return None
    task, sep, metric = name[len(PREFIX) :].rpartition("/")
    if not (sep and task and metric):
        return None
    return task, metric


def _lookup(table: Mapping[str, Any], name: str, task: str, metric: str, default: Any) -> Any:
    for key in (name, task, metric):
        if key in table:
            return table[key]
    return default


def _number(label: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{label} must be a number, got {value!r}")
    return float(value)


def compare_tasks(
    candidate: Mapping[str, float],
    champion: Mapping[str, float],
    tolerances: Mapping[str, float],
    default_tolerance: float,
    higher_is_better: bool | Mapping[str, bool] = True,
) -> TaskVerdict:
    """Compare every `task/<task>/<metric>` of the champion with the candidate's.

    Tolerances are absolute, in the metric's units, looked up by full metric name, then task,
    then `default_tolerance`. `higher_is_better` is one flag or a mapping looked up by full
    name, then metric (`{"logloss": False}`), defaulting to True. A champion metric the
    candidate lacks (or reports as NaN) fails its task; a candidate metric the champion lacks is
    listed as "new" and not judged. Names outside the `task/` scheme are ignored.
    """
    if not (math.isfinite(default_tolerance) and default_tolerance >= 0):
        raise ValueError(f"default_tolerance must be finite and >= 0, got {default_tolerance}")
    for key, tolerance in tolerances.items():
        if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance for {key!r} must be finite and >= 0, got {tolerance!r}")

    rows: list[TaskMetricComparison] = []
    for name in sorted(set(champion) | set(candidate)):
        parsed = parse_task_metric(name)
        if parsed is None:
            continue
        task, metric = parsed
        tolerance = float(_lookup(tolerances, name, task, metric, default_tolerance))
        if isinstance(higher_is_better, bool):
            higher = higher_is_better
        else:
            higher = bool(_lookup(higher_is_better, name, task, metric, True))
        base = _number(f"champion {name}", champion.get(name))
        new = _number(f"candidate {name}", candidate.get(name))
        change: float | None = None
        status: Status
        if base is None or math.isnan(base):
            status = "new" if base is None else "no_baseline"
        elif new is None or math.isnan(new):
            status = "missing"
        else:
            change = (new - base) if higher else (base - new)
            slack = ROUNDING * max(1.0, abs(base))
            status = "regressed" if change < -(tolerance + slack) else "ok"
        rows.append(
            TaskMetricComparison(
                name=name,
                task=task,
                metric=metric,
                champion=base,
                candidate=new,
                change=change,
                tolerance=tolerance,
                higher_is_better=higher,
                status=status,
            )
        )

    failing = [row for row in rows if row.status in ("regressed", "missing")]
    failed_tasks = tuple(sorted({row.task for row in failing}))
    n_tasks = len({row.task for row in rows})
    if failing:
        reason = "; ".join(_describe(row) for row in failing)
    else:
        judged = sum(row.status == "ok" for row in rows)
        reason = f"{judged} metrics over {n_tasks} tasks within tolerance"
    return TaskVerdict(
        verdict="failed" if failing else "passed",
        reason=reason,
        failed_tasks=failed_tasks,
        n_tasks=n_tasks,
        rows=tuple(rows),
    )


def _describe(row: TaskMetricComparison) -> str:
    if row.status == "missing":
        return (
            f"task {row.task!r}: {row.metric} missing in the candidate "
            f"(champion {row.champion:.6g})"
        )
    direction = "higher" if row.higher_is_better else "lower"
    return (
        f"task {row.task!r}: {row.metric} {row.champion:.6g} -> {row.candidate:.6g} "
        f"({direction} is better; change {row.change:+.6g} beyond tolerance {row.tolerance:g})"
    )
