"""Compare an arm's logged answers with the champion's: the evidence behind shadow and canary
reports. Reads the inference log; decides nothing (the policy does, in `steps/evaluate.py`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import orjson

from stagegate.lifecycle.stages import DeploymentRole
from stagegate.serving.inference_log.writer import read_records


@dataclass(frozen=True)
class ArmStats:
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Comparison:
    """`arm` (shadow or challenger) against the champion over the same window."""

    arm: ArmStats
    champion: ArmStats
    compared: int  # requests both answered with 200 (shadow: same request ids)
    agreement: float | None  # share of compared answers equal to the champion's
    mean_abs_delta: float | None  # numeric answers only: mean |arm - champion|

    def summary(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["arm"]["error_rate"] = self.arm.error_rate
        doc["champion"]["error_rate"] = self.champion.error_rate
        return doc


def _stats(status: list[int], latency: list[float]) -> ArmStats:
    if not status:
        return ArmStats(0, 0, None, None)
    lat = np.asarray(latency, dtype=float)
    return ArmStats(
        len(status),
        # Model errors only: 5xx and 599 (timeout, transport). A 4xx is the client's input,
        # and counting it would let any caller skew a report with bad requests.
        sum(1 for s in status if s >= 500),
        round(float(np.percentile(lat, 50)), 3),
        round(float(np.percentile(lat, 99)), 3),
    )


def _numeric(value: Any) -> np.ndarray | None:
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.size else None


def compare(
    root_url: str,
    model: str,
    *,
    arm_version: int,
    role: DeploymentRole,
    champion_version: int,
    since: datetime,
) -> Comparison:
    """Shadow: pair each mirrored answer with the champion's answer to the same request.
    Challenger: the two arms answer different requests, so only rates and latencies compare."""
    table = read_records(root_url, model=model, since=since)
    rows = table.select(
        ["request_id", "version", "role", "output", "status", "latency_ms"]
    ).to_pylist()
    arm = [r for r in rows if r["role"] == role and r["version"] == arm_version]
    champ = [
        r for r in rows if r["role"] == DeploymentRole.champion and r["version"] == champion_version
    ]
    arm_stats = _stats([r["status"] for r in arm], [r["latency_ms"] for r in arm])
    champ_stats = _stats([r["status"] for r in champ], [r["latency_ms"] for r in champ])
    if role is not DeploymentRole.shadow:
        ok = sum(1 for r in arm if r["status"] == 200)
        return Comparison(arm_stats, champ_stats, ok, None, None)

    champion_by_id = {r["request_id"]: r for r in champ if r["status"] == 200}
    pairs = [
        (r, champion_by_id[r["request_id"]])
        for r in arm
        if r["status"] == 200 and r["request_id"] in champion_by_id
    ]
    if not pairs:
        return Comparison(arm_stats, champ_stats, 0, None, None)
    equal, deltas = 0, []
    for mine, theirs in pairs:
        a = orjson.loads(mine["output"]) if mine["output"] else None
        b = orjson.loads(theirs["output"]) if theirs["output"] else None
        equal += a == b
        na, nb = _numeric(a), _numeric(b)
        if na is not None and nb is not None and na.shape == nb.shape:
            deltas.append(float(np.mean(np.abs(na - nb))))
    return Comparison(
        arm_stats,
        champ_stats,
        len(pairs),
        round(equal / len(pairs), 4),
        round(float(np.mean(deltas)), 6) if deltas else None,
    )
