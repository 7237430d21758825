"""From logged answers and late labels to the arrays an A/B test takes.

Each arm gets one value per unit (an assignment key, or a request), counted by the policy's
attribution rule: a label counts if it arrived within the window after its request; a
request whose window has passed without one counts as 0 or not at all; a request still
inside its window waits. Guardrails take every answer: a 5xx (or 599) is an error, and the
latency of each successful answer is its own sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from stagegate.lifecycle.policy import ExperimentCriteria
from stagegate.lifecycle.stages import DeploymentRole

FloatArray = npt.NDArray[np.float64]
ARMS = (DeploymentRole.challenger, DeploymentRole.champion)


@dataclass
class Arm:
    """One arm's samples at this look."""

    units: FloatArray  # metric per unit
    unit_ids: list[str]
    errors: FloatArray  # 1.0 per failed answer, 0.0 per successful one
    latency_ms: FloatArray  # successful answers only
    requests: int = 0
    labelled: int = 0  # requests whose label counted
    missing: int = 0  # requests past their window without a usable label
    pending: int = 0  # requests still inside their window without a label
    unusable: int = 0  # labels that carry no value of the metric (wrong type, absent field)
    late: int = 0  # labels that arrived after the window
    pre: FloatArray | None = None  # CUPED: each unit's pre-period mean, aligned with `units`

    def counts(self) -> dict[str, int]:
        return {
            "units": len(self.units),
            "requests": self.requests,
            "labelled": self.labelled,
            "missing": self.missing,
            "pending": self.pending,
            "unusable": self.unusable,
            "late": self.late,
        }


@dataclass
class Samples:
    treatment: Arm
    control: Arm
    notes: list[str] = field(default_factory=list)


def metric_value(label_json: str | None, metric: str, kind: str = "continuous") -> float | None:
    """The metric carried by a stored label (its field `metric`, or the label itself when it
    is a plain number), or None when it carries none; a bernoulli metric only 0 or 1."""
    if label_json is None:
        return None
    try:
        label = orjson.loads(label_json)
    except orjson.JSONDecodeError:
        return None
    if isinstance(label, dict):
        label = label.get(metric)
    if not isinstance(label, int | float):  # bool is an int: true converts
        return None
    value = float(label)
    if not math.isfinite(value):
        return None
    if kind == "bernoulli" and value not in (0.0, 1.0):
        return None
    return value


def _unit_means(ids: list[str], values: list[float]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for uid, v in zip(ids, values, strict=True):
        acc = sums.setdefault(uid, [0.0, 0.0])
        acc[0] += v
        acc[1] += 1
    return {uid: s / n for uid, (s, n) in sums.items()}


def _unit_id(row: dict[str, Any], c: ExperimentCriteria) -> str:
    key = row["key_hash"] if c.unit == "key" else None
    return f"k:{key}" if key else f"r:{row['request_id']}"


def build_arm(rows: list[dict[str, Any]], c: ExperimentCriteria, now: datetime) -> Arm:
    """Rows are one arm's answers (`read_outcomes`), each with its latest label or None."""
    ids: list[str] = []
    values: list[float] = []
    errors: list[float] = []
    latency: list[float] = []
    arm = Arm(np.empty(0), [], np.empty(0), np.empty(0), requests=len(rows))
    window = c.attribution_window_s
    for row in rows:
        failed = row["status"] >= 500
        errors.append(1.0 if failed else 0.0)
        if not failed and row["latency_ms"] is not None:
            latency.append(float(row["latency_ms"]))
        at: datetime = row["at"]
        value: float | None = None
        if row["label"] is not None:
            if (row["labeled_at"] - at).total_seconds() > window:
                arm.late += 1
            else:
                value = metric_value(row["label"], c.metric, c.kind)
                if value is None:
                    arm.unusable += 1
        if value is not None:
            arm.labelled += 1
        elif (now - at).total_seconds() < window and row["label"] is None:
            arm.pending += 1
            continue
        else:
            arm.missing += 1
            if c.missing_label == "exclude":
                continue
            value = 0.0
        ids.append(_unit_id(row, c))
        values.append(value)
    means = _unit_means(ids, values)
    arm.unit_ids = list(means)
    arm.units = np.fromiter(means.values(), dtype=np.float64, count=len(means))
    arm.errors = np.asarray(errors, dtype=np.float64)
    arm.latency_ms = np.asarray(latency, dtype=np.float64)
    return arm


def pre_period_means(rows: list[dict[str, Any]], c: ExperimentCriteria) -> dict[str, float]:
    """Each unit's mean metric over its labelled champion answers before the canary."""
    ids, values = [], []
    for row in rows:
        if row["label"] is None or (row["labeled_at"] - row["at"]).total_seconds() > (
            c.attribution_window_s
        ):
            continue
        value = metric_value(row["label"], c.metric, c.kind)
        if value is not None:
            ids.append(_unit_id(row, c))
            values.append(value)
    return _unit_means(ids, values)


def attach_pre(arm: Arm, pre: dict[str, float], fill: float) -> int:
    """Align the pre-period means with the arm's units; units without one get `fill` (the
    pooled mean), which adjusts them by nothing. Returns how many units had their own."""
    own = [pre.get(uid) for uid in arm.unit_ids]
    arm.pre = np.asarray([fill if v is None else v for v in own], dtype=np.float64)
    return sum(v is not None for v in own)


def samples(
    window_rows: list[dict[str, Any]],
    pre_rows: list[dict[str, Any]] | None,
    c: ExperimentCriteria,
    now: datetime,
    *,
    treatment_version: int,
    control_version: int,
) -> Samples:
    """Split the window's answers into the two arms and attach CUPED's pre-period."""
    by_arm: dict[int, list[dict[str, Any]]] = {treatment_version: [], control_version: []}
    for row in window_rows:
        if row["version"] in by_arm:
            by_arm[row["version"]].append(row)
    out = Samples(
        build_arm(by_arm[treatment_version], c, now),
        build_arm(by_arm[control_version], c, now),
    )
    if c.cuped and pre_rows is not None:
        pre = pre_period_means(pre_rows, c)
        if not pre:
            out.notes.append("CUPED off: no labelled pre-period traffic")
        else:
            fill = float(np.mean(list(pre.values())))
            matched = attach_pre(out.treatment, pre, fill) + attach_pre(out.control, pre, fill)
            out.notes.append(f"CUPED: {matched} units with a pre-period value")
    return out
