"""The local serving backend: real `stagegate serve-model` processes under one folder."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from stagegate.errors import PermanentError
from stagegate.registry.mlflow import MlflowRegistry
from stagegate.serving.backends.local import LocalBackend
from stagegate.serving.backends.protocol import ServedVersion
from stagegate.supervise.procfs import proc_stat
from tests.fixtures.mlflow_server import MlflowServer, register_sklearn_model


@pytest.fixture(scope="module")
def version(mlflow_server: MlflowServer) -> int:
    number, _ = register_sklearn_model(mlflow_server.url, "local-backend")
    return number


def _predict(url: str) -> list[int]:
    body = {
        "dataframe_split": {"columns": [f"f{i}" for i in range(6)], "data": [[0.1] * 6, [-2.0] * 6]}
    }
    r = httpx.post(f"{url}/invocations", json=body, timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    predictions: list[int] = r.json()["predictions"]
    return predictions


def _pid(detail: str) -> int:
    return int(detail.removeprefix("pid "))


def test_deploy_observe_restart_remove(
    tmp_path: Path, mlflow_server: MlflowServer, version: int
) -> None:
    backend = LocalBackend(tmp_path / "serving", tracking_uri=mlflow_server.url)
    served = ServedVersion(
        "local-backend", version, f"models:/local-backend/{version}", role="champion", device="cpu"
    )
    try:
        state = backend.deploy(served)
        assert state.healthy
        assert state.url is not None
        assert len(_predict(state.url)) == 2
        again = backend.deploy(served)  # idempotent: the same process is adopted
        assert again.detail == state.detail
        assert [s.key for s in backend.list()] == [served.key]

        pid = _pid(state.detail)
        os.kill(pid, signal.SIGKILL)  # a crash
        crashed = backend.observe("local-backend", version)
        assert crashed is not None
        assert not crashed.healthy
        restarted = backend.deploy(served)
        assert restarted.healthy
        assert restarted.detail != state.detail
        assert restarted.url is not None
        assert len(_predict(restarted.url)) == 2
        new_pid = _pid(restarted.detail)
    finally:
        removed = backend.remove("local-backend", version)
    assert removed
    assert backend.observe("local-backend", version) is None
    assert proc_stat(new_pid) is None or proc_stat(new_pid).state == "Z"  # type: ignore[union-attr]
    assert not backend.remove("local-backend", version)


def test_a_server_loads_only_the_approved_artifact(
    tmp_path: Path, mlflow_server: MlflowServer, mlflow_registry: MlflowRegistry
) -> None:
    """Served = approved: the digest recorded at intake is checked before anything is loaded,
    so an artifact swapped in the store after its approval never runs."""
    number, _ = register_sklearn_model(mlflow_server.url, "tamper")
    approved = mlflow_registry.artifact_digest("tamper", number)
    backend = LocalBackend(tmp_path / "serving", tracking_uri=mlflow_server.url)
    served = ServedVersion(
        "tamper", number, f"models:/tamper/{number}", role="champion", device="cpu", digest=approved
    )
    try:
        unchecked = backend.deploy(replace(served, digest=None))  # started before digests
        state = backend.deploy(served)  # not adopted: restarted with the check
        assert state.detail != unchecked.detail
        assert state.url is not None
        info = httpx.get(f"{state.url}/version", timeout=5, trust_env=False).json()
        assert info["digest_checked"] == approved
        assert backend.deploy(served).detail == state.detail  # a checked server is adopted
    finally:
        backend.remove("tamper", number)

    # Someone with write access to the artifact store edits the model after the approval.
    from mlflow import MlflowClient

    location = MlflowClient(mlflow_server.url).get_model_version_download_uri("tamper", str(number))
    assert location.startswith("mlflow-artifacts:/")
    stored = mlflow_server.root / "artifacts" / location.removeprefix("mlflow-artifacts:/")
    (stored / "MLmodel").write_text((stored / "MLmodel").read_text() + "\n# tampered\n")
    assert mlflow_registry.artifact_digest("tamper", number) != approved
    with pytest.raises(PermanentError, match="is not the approved"):
        backend.deploy(served, timeout_s=60)
    after = backend.observe("tamper", number)
    assert after is None or not after.healthy
