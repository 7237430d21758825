"""The `slow` marker: tests that start processes carry it, and a test without it that starts
one fails, so `pytest -m "not slow"` stays a fast inner loop that starts nothing."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

INNER_CONFTEST = """
import pytest
from tests.conftest import (  # the hooks under test, as the suite's conftest defines them
    pytest_collection_modifyitems, pytest_runtest_call, pytest_runtest_protocol,
)

@pytest.fixture
def mlflow_server():  # stands in for the real one: only its name matters to the marker
    return "started"
"""

INNER_TESTS = """
import subprocess
import pytest

def test_fast_spawn():
    subprocess.run(["true"], check=True)

@pytest.mark.slow
def test_slow_spawn():
    subprocess.run(["true"], check=True)

def test_fast_spawn_swallowed():
    try:
        subprocess.run(["true"], check=True)
    except Exception:
        pass

def test_fast_system():
    import os
    os.system("true")

@pytest.mark.e2e
def test_e2e():
    pass

def test_uses_the_server(mlflow_server):
    assert mlflow_server == "started"

def test_plain():
    assert 1 + 1 == 2
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider\n"
        "markers =\n    slow: starts processes\n    e2e: the stack\n"
    )
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    return pytester


@pytest.mark.slow  # runs pytest in a subprocess
def test_process_tests_are_marked_and_unmarked_ones_are_refused(inner: pytest.Pytester) -> None:
    slow = inner.runpytest_subprocess("--collect-only", "-q", "-m", "slow")
    listed = {line.split("::")[-1] for line in slow.outlines if "::" in line}
    assert listed == {"test_slow_spawn", "test_e2e", "test_uses_the_server"}

    run = inner.runpytest_subprocess("-q", "-rfE")
    run.assert_outcomes(passed=4, failed=3)
    out = run.stdout.str()
    for name in ("test_fast_spawn", "test_fast_spawn_swallowed", "test_fast_system"):
        assert f"FAILED test_inner.py::{name} " in out
    assert "starts a process (subprocess.Popen ['true']) but is not marked slow" in out
    assert "test_fast_spawn_swallowed tried to start a process" in out
    assert "os.system" in out


def test_this_run_refuses_a_process_in_a_fast_test() -> None:
    """The guard is live in the process running this very test (under `make test`, a
    pytest-xdist worker: its tests run on the main thread, which the guard watches)."""
    from tests import conftest  # the suite's own conftest, as pytest loaded it

    assert threading.current_thread() is threading.main_thread()
    try:
        with pytest.raises(conftest.ProcessInFastTest, match="is not marked slow"):
            subprocess.run(["true"], check=True)
        assert conftest._guard.refused == ["subprocess.Popen ['true']"]
    finally:
        conftest._guard.refused.clear()  # refused on purpose: not a failure of this test
