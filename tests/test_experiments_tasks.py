"""Evidence per task: a multi-task model is judged task by task against the champion."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stagegate.experiments.tasks import compare_tasks, parse_task_metric


def _metrics(values: dict[str, float]) -> dict[str, float]:
    return {f"task/{name}": value for name, value in values.items()}


@pytest.fixture
def champion() -> dict[str, float]:
    rng = np.random.default_rng(0)
    out = {f"task/t{i:02d}/auc": float(rng.uniform(0.6, 0.9)) for i in range(32)}
    out |= {f"task/t{i:02d}/logloss": float(rng.uniform(0.2, 0.5)) for i in range(32)}
    out["val_loss"] = 0.3  # not a task metric: judged elsewhere
    return out


def test_parse_task_metric() -> None:
    assert parse_task_metric("task/ctr/auc") == ("ctr", "auc")
    assert parse_task_metric("task/ads/us/auc") == ("ads/us", "auc")
    for name in ("auc", "task/auc", "task//auc", "task/ctr/", "tasks/ctr/auc"):
        assert parse_task_metric(name) is None


def test_32_tasks_within_tolerance_pass(champion: dict[str, float]) -> None:
    rng = np.random.default_rng(1)
    candidate = {name: value + rng.uniform(-0.004, 0.004) for name, value in champion.items()}
    verdict = compare_tasks(
        candidate, champion, {}, default_tolerance=0.005, higher_is_better={"logloss": False}
    )
    assert verdict.passed, verdict.reason
    assert verdict.n_tasks == 32
    assert len(verdict.rows) == 64
    assert verdict.failed_tasks == ()
    assert "64 metrics over 32 tasks" in verdict.reason


def test_one_task_regressing_fails_the_gate_and_is_named(champion: dict[str, float]) -> None:
    candidate = {name: value + 0.01 for name, value in champion.items() if "auc" in name}
    candidate |= {name: value - 0.01 for name, value in champion.items() if "logloss" in name}
    candidate["task/t17/auc"] = champion["task/t17/auc"] - 0.02  # the average still improves
    verdict = compare_tasks(
        candidate, champion, {}, default_tolerance=0.01, higher_is_better={"logloss": False}
    )
    assert not verdict.passed
    assert verdict.verdict == "failed"
    assert verdict.failed_tasks == ("t17",)
    assert "task 't17': auc" in verdict.reason
    (row,) = [row for row in verdict.rows if row.status == "regressed"]
    assert row.name == "task/t17/auc"
    assert row.change == pytest.approx(-0.02)


def test_lower_is_better_flips_the_direction(champion: dict[str, float]) -> None:
    candidate = dict(champion)
    candidate["task/t03/logloss"] = champion["task/t03/logloss"] + 0.05  # worse loss
    candidate["task/t04/logloss"] = champion["task/t04/logloss"] - 0.05  # better loss
    verdict = compare_tasks(
        candidate, champion, {}, default_tolerance=0.01, higher_is_better={"logloss": False}
    )
    assert verdict.failed_tasks == ("t03",)
    assert "lower is better" in verdict.reason
    # Treated as higher-is-better, the better loss is now the regression.
    flipped = compare_tasks(candidate, champion, {}, default_tolerance=0.01)
    assert flipped.failed_tasks == ("t04",)


def test_tolerance_per_task_and_per_metric() -> None:
    champion = _metrics({"a/auc": 0.8, "a/recall": 0.5, "b/auc": 0.8, "c/auc": 0.8})
    candidate = _metrics({"a/auc": 0.75, "a/recall": 0.45, "b/auc": 0.75, "c/auc": 0.75})
    tolerances = {"a": 0.1, "task/a/recall": 0.01, "b": 0.05}
    verdict = compare_tasks(candidate, champion, tolerances, default_tolerance=0.0)
    by_name = {row.name: row for row in verdict.rows}
    assert by_name["task/a/auc"].tolerance == 0.1
    assert by_name["task/a/recall"].tolerance == 0.01
    assert by_name["task/c/auc"].tolerance == 0.0
    # b regresses by exactly its tolerance, in float arithmetic: that is within it.
    assert by_name["task/b/auc"].status == "ok"
    assert verdict.failed_tasks == ("a", "c")


def test_missing_and_new_metrics() -> None:
    champion = _metrics({"a/auc": 0.8, "b/auc": 0.8})
    candidate = _metrics({"a/auc": 0.8, "b/auc": float("nan"), "c/auc": 0.1})
    verdict = compare_tasks(candidate, champion, {}, default_tolerance=0.01)
    status = {row.name: row.status for row in verdict.rows}
    assert status == {"task/a/auc": "ok", "task/b/auc": "missing", "task/c/auc": "new"}
    assert verdict.failed_tasks == ("b",)
    assert "missing in the candidate" in verdict.reason
    gone = compare_tasks(_metrics({"a/auc": 0.8}), champion, {}, default_tolerance=0.01)
    assert gone.failed_tasks == ("b",)
    json.dumps(verdict.to_dict())


def test_a_champion_without_a_value_is_not_judged() -> None:
    champion = _metrics({"a/auc": float("nan")})
    verdict = compare_tasks(_metrics({"a/auc": 0.1}), champion, {}, default_tolerance=0.0)
    assert verdict.passed
    assert verdict.rows[0].status == "no_baseline"


def test_bad_input_is_refused() -> None:
    champion = _metrics({"a/auc": 0.8})
    with pytest.raises(ValueError, match="default_tolerance"):
        compare_tasks(champion, champion, {}, default_tolerance=-1)
    with pytest.raises(ValueError, match="tolerance for 'a'"):
        compare_tasks(champion, champion, {"a": float("nan")}, default_tolerance=0)
    with pytest.raises(ValueError, match="candidate task/a/auc must be a number"):
        compare_tasks({"task/a/auc": "high"}, champion, {}, default_tolerance=0)  # type: ignore[dict-item]
