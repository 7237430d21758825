"""`stagegate worker`: serve the deployments of `prefect.yaml`, with their triggers, and start
their runs warm.

A Runner polling every second needs no work pool. `prefect deploy --all` uses the same file
at scale, with a process work pool (see docs/events-and-flows.md).

Warm starts. The flows are added with `Runner.aadd_flow`, so the Runner holds each flow in
memory and starts its runs with `DirectSubprocessStarter`, which calls
`prefect.flow_engine.run_flow_in_subprocess` (`aadd_deployment` keeps no flow, and each run
was then `python -m prefect.engine`, which loads the entrypoint again). That function builds
the child's payload, environment and control-channel bootstrap, then starts it with
`multiprocessing.get_context("spawn")`: a fresh interpreter that imports prefect, mlflow and
Stagegate again, about 5 s per run. The worker starts a forkserver that has imported them
once (`warm_start.py`, which also says why forking from it is safe), and makes that call
return the forkserver context instead.

How it is plugged in: `run_flow_in_subprocess` reads its module's global `multiprocessing`
when it runs; in the worker process only, that one global is replaced by a stand-in whose
`get_context()` answers the forkserver context and which forwards everything else to the
real module. All of Prefect's code still runs as written, none of it is copied here, and no
other module in the process sees a change. The other ways are more fragile: replacing
`prefect.runner._starter_direct.run_flow_in_subprocess` (the override its docstring offers)
would mean copying Prefect's 60-line function and its private helpers, and changing
`multiprocessing.get_context` itself would change every library in the process. The
worker checks the assumption (the global exists and the function asks for "spawn") before
it patches anything, and otherwise logs a warning and starts runs cold.
`STAGEGATE_WORKER_START=spawn` keeps Prefect's cold start, as the benchmark's baseline.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter

from stagegate import warm_start
from stagegate.errors import PermanentError

log = logging.getLogger(__name__)


def find_project(start: Path | None = None) -> Path:
    """The folder holding `prefect.yaml`: `$STAGEGATE_PROJECT_DIR`, else cwd and its parents."""
    if env := os.environ.get("STAGEGATE_PROJECT_DIR"):
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "prefect.yaml").is_file():
            return folder
    raise PermanentError("no prefect.yaml here or above; set STAGEGATE_PROJECT_DIR")


def read_spec(project: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load((project / "prefect.yaml").read_text())
    return list(spec["deployments"])


async def add_flows(runner: Any, project: Path, deployments: list[dict[str, Any]]) -> None:
    """Add each deployment's flow to `runner`, in memory, with its triggers and schedules."""
    from prefect.events import DeploymentTriggerTypes
    from prefect.flows import load_flow_from_entrypoint

    adapter: TypeAdapter[Any] = TypeAdapter(DeploymentTriggerTypes)
    for d in deployments:
        flow: Any = load_flow_from_entrypoint(str(project / d["entrypoint"]))
        triggers = [
            adapter.validate_python({"name": f"{d['name']}__automation_{i}", **t})
            for i, t in enumerate(d.get("triggers", []), start=1)
        ]
        schedules = d.get("schedules", [])
        intervals = [s["interval"] for s in schedules if "interval" in s]
        crons = [s["cron"] for s in schedules if "cron" in s]
        await runner.aadd_flow(
            flow,
            name=d["name"],
            description=d.get("description"),
            triggers=triggers or None,
            interval=intervals or None,
            cron=crons or None,
        )


class _ForkserverOnly:
    """Stands in for the `multiprocessing` module inside `prefect.flow_engine`."""

    def __init__(self, ctx: multiprocessing.context.BaseContext) -> None:
        self._ctx = ctx

    def get_context(self, method: str | None = None) -> multiprocessing.context.BaseContext:
        return self._ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def use_forkserver(ctx: multiprocessing.context.BaseContext) -> bool:
    """Make Prefect start flow runs from `ctx`; False (and runs stay cold) if it cannot."""
    from prefect import flow_engine

    source = inspect.getsource(flow_engine.run_flow_in_subprocess)
    if getattr(flow_engine, "multiprocessing", None) is not multiprocessing or (
        'multiprocessing.get_context("spawn")' not in source
    ):
        log.warning("prefect.flow_engine no longer starts runs as expected; runs start cold")
        return False
    setattr(flow_engine, "multiprocessing", _ForkserverOnly(ctx))  # noqa: B010
    return True


async def _serve(
    project: Path, deployments: list[dict[str, Any]], poll_s: float, ready_file: Path | None
) -> None:
    from prefect.runner import Runner

    runner = Runner(name="stagegate-worker", query_seconds=poll_s, pause_on_shutdown=False)
    await add_flows(runner, project, deployments)
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
    # Flow runs import their flows' modules; let them (and the forkserver) find the project.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(project), os.environ.get("PYTHONPATH", "")) if p
    )
    sys.path.insert(0, str(project))
    deployments = read_spec(project)
    if warm_start.start_mode() == warm_start.FORKSERVER:
        # Before the event loop and Prefect's threads exist; the forkserver is its own process.
        modules = warm_start.preload([d["entrypoint"] for d in deployments])
        use_forkserver(warm_start.start_forkserver(modules))
    asyncio.run(_serve(project, deployments, poll_s, ready_file))
