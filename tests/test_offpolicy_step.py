"""The offline counterfactual gate on a real inference log: the champion's logged decisions
(feature rows with the action and its propensity), real labels as rewards, a real database;
the candidate's scoring is a function behind the fake registry's `predict`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from sqlalchemy.engine import Engine

from stagegate.db import transaction, utcnow
from stagegate.events.sink import MemorySink
from stagegate.governance import evaluations, policies, transitions
from stagegate.lifecycle.policy import OffPolicyCriteria, default_policy
from stagegate.lifecycle.stages import Stage
from stagegate.serving.inference_log.labels import LabelRecord, attach_labels
from stagegate.serving.inference_log.records import InferenceRecord
from stagegate.serving.inference_log.writer import LocalInferenceLog
from stagegate.steps.common import SERVICE
from stagegate.steps.offpolicy import action_distribution, evaluate_candidate
from tests.factories import Factory
from tests.fakes import FakeRegistry

MODEL = "ads"
WEIGHTS = np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]])  # context -> action


def _best(x: np.ndarray) -> np.ndarray:
    return np.argmax(x @ WEIGHTS, axis=1)


def _log_bandit(root: Path, n: int, *, propensities: bool = True, seed: int = 0) -> None:
    """The champion: softmax over noisy scores, one context per request; clicks are likelier
    for the truly best action. Its decisions and their probabilities are in its answers."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    logits = x @ WEIGHTS * 0.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    actions = np.array([rng.choice(3, p=p) for p in probs])
    clicks = rng.random(n) < np.where(actions == _best(x), 0.6, 0.1)
    log = LocalInferenceLog(str(root), features_flush_interval_s=0.05)
    at = utcnow() - timedelta(hours=1)
    labels = []
    for i in range(n):
        rid = f"r{i}"
        answer: dict[str, Any] = {"action": int(actions[i])}
        if propensities:
            answer["propensity"] = float(probs[i, actions[i]])
        body = {"dataframe_split": {"columns": ["f0", "f1", "f2"], "data": [x[i].tolist()]}}
        log.append(
            InferenceRecord(
                rid,
                MODEL,
                1,
                "champion",
                None,
                body,
                [answer],
                200,
                1.0,
                at + timedelta(milliseconds=i),
                body=orjson.dumps(body),
                content_type="application/json",
            )
        )
        labels.append(LabelRecord(rid, MODEL, {"click": int(clicks[i])}, at))
    log.close()
    attach_labels(str(root), labels)


def _contexts(rows: pa.Table) -> np.ndarray:
    return np.column_stack([rows.column(f"f{i}").to_numpy() for i in range(3)])


def _setup(
    engine: Engine,
    factory: Factory,
    registry: FakeRegistry,
    candidate: Callable[[pa.Table], list[Any]],
    **criteria: Any,
) -> None:
    factory.version(MODEL, 1)
    factory.version(MODEL, 2)
    factory.place(MODEL, 1, Stage.production)
    registry.add(MODEL, 2)
    registry.models[(MODEL, 2)] = candidate
    c = OffPolicyCriteria.model_validate({"reward": "click", "min_rows": 500, **criteria})
    with transaction(engine) as s:
        policies.set_policy(
            s, MODEL, default_policy().model_copy(update={"offpolicy": c}), actor="test"
        )


def _good(rows: pa.Table) -> list[Any]:
    return _best(_contexts(rows)).tolist()


def _bad(rows: pa.Table) -> list[Any]:
    return np.argmin(_contexts(rows) @ WEIGHTS, axis=1).tolist()


def test_a_candidate_that_picks_better_actions_passes_and_a_worse_one_fails(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _log_bandit(tmp_path, 2000)
    registry = FakeRegistry()
    _setup(engine, factory, registry, _good)
    with transaction(engine) as s:
        t, _ = transitions.request(
            s,
            principal=SERVICE,
            model=MODEL,
            version=2,
            to_stage=Stage.shadow,
            reason="intake",
            now=utcnow(),
        )
        held = {g["gate"]: g for g in t.gate_results}["offpolicy"]
    assert not held["passed"]
    assert "no offpolicy report yet" in held["reason"]

    good = evaluate_candidate(engine, registry, sink, str(tmp_path), MODEL, 2)
    assert (good.decided, good.passed, good.verdict) == (True, True, "pass"), good.reason
    assert good.summary["n_used"] == 2000
    # A deterministic best-action policy earns about 0.6 a click; the champion about 0.3.
    assert good.summary["candidate"]["value"] == pytest.approx(0.6, abs=0.06)
    assert good.summary["difference"] > 0.2
    assert good.summary["candidate"]["ess"] < 2000
    with transaction(engine) as s:
        report = evaluations.facts(s, MODEL, 2)["offpolicy"]
        assert (report.passed, report.champion_version) == (True, 1)
        gates = {g["gate"]: g for g in transitions.get_transition(s, t.id).gate_results}
    assert gates["offpolicy"]["passed"], gates  # re-gated at once; approvals still wait
    assert not gates["approvals"]["passed"]

    # Keyed: the same candidate against the same champion is decided once.
    registry.models[(MODEL, 2)] = _bad
    again = evaluate_candidate(engine, registry, sink, str(tmp_path), MODEL, 2)
    assert again.passed

    factory.version(MODEL, 3)
    registry.add(MODEL, 3)
    registry.models[(MODEL, 3)] = _bad
    bad = evaluate_candidate(engine, registry, sink, str(tmp_path), MODEL, 3)
    assert (bad.passed, bad.verdict) == (False, "fail")
    assert bad.summary["difference"] < -0.1


def test_without_logged_propensities_the_verdict_is_insufficient_data_and_policy_decides(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _log_bandit(tmp_path, 800, propensities=False)
    registry = FakeRegistry()
    _setup(engine, factory, registry, _good)
    blocked = evaluate_candidate(engine, registry, sink, str(tmp_path), MODEL, 2)
    assert (blocked.verdict, blocked.passed) == ("insufficient_data", False)
    assert blocked.summary["n_missing_propensity"] == 800


def test_insufficient_data_may_let_the_candidate_through_by_policy(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _log_bandit(tmp_path, 300)
    registry = FakeRegistry()
    _setup(engine, factory, registry, _good, insufficient_data_blocks=False)
    out = evaluate_candidate(engine, registry, sink, str(tmp_path), MODEL, 2)
    assert (out.verdict, out.passed) == ("insufficient_data", True)
    assert "300 logged decisions" in out.reason
    assert "does not block" in out.reason


def test_a_candidate_whose_artifact_changed_or_that_cannot_score_fails_its_gate(
    engine: Engine, factory: Factory, sink: MemorySink, tmp_path: Path
) -> None:
    _log_bandit(tmp_path, 600)
    registry = FakeRegistry()

    def broken(rows: pa.Table) -> list[Any]:
        return ["buy"] * rows.num_rows

    _setup(engine, factory, registry, broken)
    out = evaluate_candidate(engine, registry, sink, str(tmp_path), MODEL, 2)
    assert (out.verdict, out.passed) == ("fail", False)
    assert "one action (0..K-1) or a list of action probabilities" in out.reason


@pytest.mark.parametrize(
    ("answers", "expected"),
    [
        ([0, 2], [[1, 0, 0], [0, 0, 1]]),
        ([[0.2, 0.8, 0.0], [0.5, 0.25, 0.25]], [[0.2, 0.8, 0], [0.5, 0.25, 0.25]]),
        ([{"action": 1}, {"action": 0}], [[0, 1, 0], [1, 0, 0]]),
        ([3, 0], [[0, 0, 0, 1], [1, 0, 0, 0]]),  # an action the champion never took
    ],
)
def test_the_candidates_answers_become_action_probabilities(
    answers: list[Any], expected: list[list[float]]
) -> None:
    assert action_distribution(answers, 3).tolist() == expected
