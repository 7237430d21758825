"""The offline counterfactual gate, before a candidate serves anything.

The champion's logged decisions (its feature rows, with the action it took and that action's
probability, named by the policy) and their rewards (feedback labels) are replayed: the
candidate scores the same contexts in one batch, and IPS, SNIPS or doubly robust estimates
its reward on them (`experiments/offpolicy.py`). The verdict is recorded as an `offpolicy`
evaluation bound to the candidate's digest and the champion, keyed like every report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa  # type: ignore[import-untyped]

from stagegate.db import Engine, transaction, utcnow
from stagegate.errors import InvalidInput, PermanentError
from stagegate.events.sink import EventSink
from stagegate.experiments.offpolicy import GatePolicy, counterfactual_gate
from stagegate.experiments.reward_model import cross_fitted_q_hat
from stagegate.governance import evaluations, transitions
from stagegate.lifecycle.policy import OffPolicyCriteria
from stagegate.lifecycle.stages import DeploymentRole, Stage
from stagegate.registry.protocol import ModelRegistry
from stagegate.serving.inference_log.features import META_SCHEMA, read_features
from stagegate.serving.inference_log.labels import read_labels
from stagegate.steps.common import SERVICE, evidence_context, regate
from stagegate.steps.experiment_data import metric_value

KIND = "offpolicy"
_META = frozenset(META_SCHEMA.names)


@dataclass
class OffPolicyOutcome:
    model: str
    version: int
    decided: bool = False
    passed: bool = False
    verdict: str = ""  # pass | fail | insufficient_data
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    approved: list[str] = field(default_factory=list)


@dataclass
class Replay:
    """The champion's logged decisions that can be replayed, and what was left out."""

    contexts: pa.Table
    actions: npt.NDArray[np.int64]
    propensities: npt.NDArray[np.float64]  # NaN where the champion logged none
    rewards: npt.NDArray[np.float64]
    counts: dict[str, int] = field(default_factory=dict)


def _latest_rewards(log_url: str, model: str, c: OffPolicyCriteria) -> dict[str, float]:
    labels = read_labels(log_url, model=model).to_pylist()  # ordered by arrival: last wins
    rewards: dict[str, float] = {}
    for row in labels:
        value = metric_value(row["label"], c.reward)
        if value is None:
            rewards.pop(row["request_id"], None)
        else:
            rewards[row["request_id"]] = value
    return rewards


def replay(table: pa.Table, rewards: dict[str, float], c: OffPolicyCriteria) -> Replay:
    """Rows with an action and a reward, one row per request (a reward is per request)."""
    counts = {"logged_rows": table.num_rows}
    if table.num_rows == 0 or c.action_column not in table.column_names:
        counts["no_action"] = table.num_rows
        empty = np.empty(0)
        return Replay(table.slice(0, 0), empty.astype(np.int64), empty, empty, counts)
    ids = table.column("request_id").to_pylist()
    per_request: dict[str, int] = {}
    for rid in ids:
        per_request[rid] = per_request.get(rid, 0) + 1
    actions_raw = table.column(c.action_column).to_pylist()
    props_raw = (
        table.column(c.propensity_column).to_pylist()
        if c.propensity_column in table.column_names
        else [None] * table.num_rows
    )
    keep: list[int] = []
    counts.update(multi_row=0, no_action=0, no_reward=0)
    for i, rid in enumerate(ids):
        action = actions_raw[i]
        if per_request[rid] > 1:
            counts["multi_row"] += 1
        elif not _is_action(action):
            counts["no_action"] += 1
        elif rid not in rewards:
            counts["no_reward"] += 1
        else:
            keep.append(i)
    kept = table.take(pa.array(keep, pa.int64()))
    columns = (
        list(c.context_columns)
        if c.context_columns is not None
        else [
            name
            for name in kept.column_names
            if name not in _META and not name.startswith("prediction")
        ]
    )
    missing = [name for name in columns if name not in kept.column_names]
    if missing:
        raise InvalidInput(f"the logged rows have no context column {', '.join(missing)}")
    props = np.array(
        [math.nan if (p := props_raw[i]) is None else float(p) for i in keep], dtype=np.float64
    )
    return Replay(
        contexts=kept.select(columns),
        actions=np.array([int(actions_raw[i]) for i in keep], dtype=np.int64),
        propensities=props,
        rewards=np.array([rewards[ids[i]] for i in keep], dtype=np.float64),
        counts=counts,
    )


def _is_action(value: Any) -> bool:
    """An action is a non-negative whole number (NaN, text and fractions are not)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
        and float(value).is_integer()
    )


def action_distribution(answers: list[Any], n_actions: int) -> npt.NDArray[np.float64]:
    """The candidate's probability of each action per row: its answer is a list of
    probabilities, or one action (a deterministic policy)."""
    dist = np.zeros((len(answers), n_actions))
    for i, raw in enumerate(answers):
        # A one-key object per row (a DataFrame answer's record) holds the answer itself.
        answer = next(iter(raw.values())) if isinstance(raw, dict) and len(raw) == 1 else raw
        if isinstance(answer, list | tuple):
            if len(answer) > n_actions:
                n_actions = len(answer)
                dist = np.pad(dist, ((0, 0), (0, n_actions - dist.shape[1])))
            dist[i, : len(answer)] = answer
        elif _is_action(answer):
            if int(answer) >= dist.shape[1]:
                dist = np.pad(dist, ((0, 0), (0, int(answer) + 1 - dist.shape[1])))
            dist[i, int(answer)] = 1.0
        else:
            raise InvalidInput(
                f"the candidate answered {answer!r} for row {i}: an off-policy gate needs "
                "one action (0..K-1) or a list of action probabilities per row"
            )
    return dist


def _numeric(contexts: pa.Table) -> npt.NDArray[np.float64]:
    """The reward model's inputs: the numeric context columns (others are left out)."""
    cols = [
        np.nan_to_num(
            contexts.column(name).to_numpy(zero_copy_only=False).astype(np.float64), nan=0.0
        )
        for name in contexts.column_names
        if pa.types.is_integer(contexts.schema.field(name).type)
        or pa.types.is_floating(contexts.schema.field(name).type)
        or pa.types.is_boolean(contexts.schema.field(name).type)
    ]
    n = contexts.num_rows
    return np.column_stack(cols) if cols else np.zeros((n, 0))


def judge(
    registry: ModelRegistry,
    model: str,
    version: int,
    digest: str | None,
    data: Replay,
    c: OffPolicyCriteria,
) -> dict[str, Any]:
    """Score the replayed contexts with the candidate and run the counterfactual gate."""
    gate = GatePolicy(
        margin=c.margin,
        confidence=c.confidence,
        min_rows=c.min_rows,
        method=c.estimator,
        block_on_insufficient_data=c.insufficient_data_blocks,
    )
    n = len(data.rewards)
    if n < c.min_rows:  # not worth loading the candidate: too little to replay
        blocks = c.insufficient_data_blocks
        return {
            "verdict": "insufficient_data",
            "reason": f"{n} logged decisions with an action and a reward; min_rows is "
            f"{c.min_rows} ({'blocks' if blocks else 'does not block'} by policy)",
            "blocks": blocks,
            "passed": not blocks,
            "method": c.estimator,
            "n_rows": n,
            "n_used": 0,
        }
    answers = registry.predict(model, version, data.contexts, digest=digest)
    n_actions = int(data.actions.max()) + 1
    dist = action_distribution(answers, n_actions)
    n_actions = max(n_actions, dist.shape[1])
    q_hat = None
    if c.estimator == "dr":
        q_hat = cross_fitted_q_hat(_numeric(data.contexts), data.actions, data.rewards, n_actions)
    return counterfactual_gate(
        data.rewards, data.propensities, data.actions, dist, q_hat, gate
    ).to_dict()


def evaluate_candidate(
    engine: Engine,
    registry: ModelRegistry,
    sink: EventSink,
    log_url: str,
    model: str,
    version: int,
    *,
    now: datetime | None = None,
) -> OffPolicyOutcome:
    """Decide the candidate's offline report once (keyed by digest and champion)."""
    now = now or utcnow()
    ctx = evidence_context(engine, model, version, KIND)
    policy, recorded, champion_version = ctx.policy, ctx.recorded, ctx.champion_version
    digest, since, stage = ctx.digest, ctx.since, ctx.stage
    out = OffPolicyOutcome(model, version)
    c = policy.offpolicy
    if c is None or stage is not Stage.candidate:
        out.reason = f"v{version} is {stage}: no off-policy gate to decide"
        return out
    if recorded is not None:
        out.decided, out.passed, out.reason = True, recorded.passed, recorded.reason
        out.summary = dict(recorded.summary)
        out.verdict = str(out.summary.get("verdict", ""))
        return out
    if champion_version is None:
        summary: dict[str, Any] = {"verdict": "pass", "n_used": 0}
        passed, reason = True, "no champion yet: no logged decisions to replay"
    else:
        table = read_features(
            log_url,
            model=model,
            version=champion_version,
            role=DeploymentRole.champion,
            since=now - timedelta(seconds=c.window_s),
            until=now,
        )
        data = replay(table, _latest_rewards(log_url, model, c), c)
        try:
            summary = judge(registry, model, version, digest, data, c)
        except (PermanentError, InvalidInput) as exc:
            # A candidate that cannot score the champion's contexts fails its gate; a
            # passing failure (the registry down) is retryable and raises instead.
            summary = {"verdict": "fail", "passed": False, "reason": exc.detail}
        summary["replay"] = data.counts
        passed, reason = bool(summary["passed"]), str(summary["reason"])
    with transaction(engine) as session:
        report = evaluations.record(
            session,
            model=model,
            version=version,
            kind=KIND,
            passed=passed,
            reason=reason[:2000],
            sample_size=int(summary.get("n_used") or 0),
            summary=_jsonable(summary),
            window_start=since,
            window_end=now,
            champion_version=champion_version,
            actor=SERVICE.name,
        )
        out.decided, out.passed, out.reason = True, report.passed, report.reason
        out.summary = dict(report.summary)
        out.verdict = str(out.summary.get("verdict", ""))
    with transaction(engine, read_only=True) as session:
        waiting = transitions.pending_ids(session, model=model, version=version)
    out.approved = regate(engine, sink, waiting)
    return out


def _jsonable(value: Any) -> Any:
    """Estimates hold numpy floats and may hold infinities: plain JSON values only."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
