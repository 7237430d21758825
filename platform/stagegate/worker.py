"""`stagegate worker`: serve the deployments of `prefect.yaml`, with their triggers, in-process.

A Runner polling every second needs no work pool; each run is still a subprocess, and its
imports (prefect, mlflow) are most of the 6.5-7.5 s from trigger to Running measured here.
`prefect deploy --all` uses the same file at scale.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter

from stagegate.errors import PermanentError


def find_project(start: Path | None = None) -> Path:
    """The folder holding `prefect.yaml`: `$STAGEGATE_PROJECT_DIR`, else cwd and its parents."""
    if env := os.environ.get("STAGEGATE_PROJECT_DIR"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "prefect.yaml").is_file():
            return folder
    raise PermanentError("no prefect.yaml here or above; set STAGEGATE_PROJECT_DIR")


async def load_deployments(project: Path) -> list[Any]:
    from prefect.events import DeploymentTriggerTypes
    from prefect.flows import load_flow_from_entrypoint

    adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    spec = yaml.safe_load((project / "prefect.yaml").read_text())
    out = []
    for d in spec["deployments"]:
        flow: Any = load_flow_from_entrypoint(str(project / d["entrypoint"]))
        triggers = [
            adapter.validate_python({"name": f"{d['name']}__automation_{i}", **t})
            for i, t in enumerate(d.get("triggers", []), start=1)
        ]
        intervals = [s["interval"] for s in d.get("schedules", []) if "interval" in s]
        out.append(
            await flow.ato_deployment(
                name=d["name"],
                description=d.get("description"),
                triggers=triggers or None,
                interval=intervals or None,
            )
        )
    return out


async def _serve(project: Path, poll_s: float, ready_file: Path | None) -> None:
    from prefect.runner import Runner

    runner = Runner(name="stagegate-worker", query_seconds=poll_s, pause_on_shutdown=False)
    for deployment in await load_deployments(project):
        await runner.aadd_deployment(deployment)
    if ready_file is not None:
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.touch()
    try:
        await runner.start()
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


def serve(*, poll_s: float, ready_file: Path | None = None) -> None:
    project = find_project()
    # Flow runs are subprocesses that import their entrypoint; let them find the project.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(project), os.environ.get("PYTHONPATH", "")) if p
    )
    sys.path.insert(0, str(project))
    asyncio.run(_serve(project, poll_s, ready_file))
