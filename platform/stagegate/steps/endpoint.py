"""Endpoint sync: make the data plane match the database (which versions serve, and how).

The database says which versions are in production, canary and shadow. This step deploys
them on the serving backend, writes the model's traffic policy for the router, waits until
the router has picked it up, and only then stops servers that no longer have a role, so no
request is routed to a server that is going away. Idempotent: run it as often as you like.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from stagegate.db import transaction
from stagegate.errors import RetryableError
from stagegate.governance.models import ModelVersion
from stagegate.governance.policies import get_policy
from stagegate.lifecycle.stages import DEPLOYMENT_ROLE, Stage
from stagegate.serving.backends.protocol import ServedVersion, ServingBackend
from stagegate.serving.policy import Arm, RouterConfig, TrafficPolicy

LIVE = (Stage.production, Stage.canary, Stage.shadow)


@dataclass
class EndpointState:
    model: str
    served: dict[str, tuple[int, str]] = field(default_factory=dict)  # role -> (version, url)
    removed: list[int] = field(default_factory=list)
    policy: TrafficPolicy | None = None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace(router_file: Path, config: RouterConfig) -> None:
    tmp = router_file.with_name(f".{router_file.name}.tmp")
    tmp.write_text(config.model_dump_json(indent=2))
    os.replace(tmp, router_file)  # the router sees the old file or the new, never half


def ensure_policy_file(router_file: Path) -> None:
    """Create an empty router config (no routes yet) unless one exists."""
    with _locked(router_file):
        if not router_file.exists():
            _replace(router_file, RouterConfig())


def write_policy(router_file: Path, model: str, policy: TrafficPolicy | None) -> None:
    """Replace (or drop) one model's policy in the router's file, atomically."""
    with _locked(router_file):
        current = (
            RouterConfig.model_validate_json(router_file.read_bytes())
            if router_file.exists()
            else RouterConfig()
        )
        others = [p for p in current.policies if p.model != model]
        _replace(router_file, RouterConfig(policies=[*others, policy] if policy else others))


def _router_has(
    router_url: str, policy: TrafficPolicy | None, model: str, timeout_s: float
) -> None:
    """Wait until the router serves `policy` for `model` (it reloads within about 1 s)."""
    deadline = time.monotonic() + timeout_s
    want = policy.model_dump(mode="json") if policy else None
    while time.monotonic() < deadline:
        try:
            doc = httpx.get(f"{router_url}/policies", timeout=2, trust_env=False).json()
            have = next((p for p in doc.get("policies", []) if p.get("model") == model), None)
            if have == want:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    raise RetryableError(f"router at {router_url} did not pick up the policy for {model}")


def sync_endpoint(
    engine: Engine,
    backend: ServingBackend,
    router_file: Path,
    model: str,
    *,
    router_url: str | None = None,
    device: str = "auto",
    reload_timeout_s: float = 15,
) -> EndpointState:
    with transaction(engine, read_only=True) as session:
        live = {
            v.stage: v.version
            for v in session.exec(
                select(ModelVersion).where(
                    ModelVersion.model_name == model, col(ModelVersion.stage).in_(LIVE)
                )
            )
        }
        traffic = get_policy(session, model).traffic
    state = EndpointState(model)
    for stage, version in live.items():
        role = DEPLOYMENT_ROLE[stage].value
        served = ServedVersion(
            model,
            version,
            f"models:/{model}/{version}",
            role=role,  # type: ignore[arg-type]
            device=device,
        )
        deployed = backend.deploy(served)
        if deployed.url is None:
            raise RetryableError(f"{served.key} has no URL after deploy")
        state.served[role] = (version, deployed.url)

    def arm(role: str) -> Arm | None:
        if role not in state.served:
            return None
        version, url = state.served[role]
        return Arm(version=version, url=url)

    champion, challenger, shadow = arm("champion"), arm("challenger"), arm("shadow")
    # Without a champion there is nothing to answer clients with: no route at all.
    if champion is not None:
        state.policy = TrafficPolicy(
            model=model,
            champion=champion,
            challenger=challenger,
            challenger_weight=traffic.challenger_weight if challenger else 0.0,
            shadow=shadow,
            shadow_fraction=traffic.shadow_fraction if shadow else 0.0,
            assignment_field=traffic.assignment_field,
        )
    write_policy(router_file, model, state.policy)
    if router_url is not None:
        _router_has(router_url, state.policy, model, reload_timeout_s)
    keep = {version for version, _ in state.served.values()}
    for d in backend.list():
        if d.model == model and d.version not in keep:
            backend.remove(model, d.version)
            state.removed.append(d.version)
    return state
