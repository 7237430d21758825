"""Converge: make one model's data plane match its desired endpoint state, then announce.

Promote (after each stage move) and reconcile (every minute) both call `converge(model)`:

1. read the desired state and its generation (written with the stage move);
2. deploy every version it names (idempotent: a running server is adopted);
3. publish the route, the traffic policy with the servers' URLs, for that generation;
4. wait until the router serves that generation;
5. only then remove servers whose version lost its role, so no request meets a dying one;
6. mark the generation converged and announce `stagegate.transition.applied` for every
   applied transition it covers. A lost announcement stays unannounced in the database, so
   the next converge (reconcile's, at the latest) sends it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx

from stagegate.db import Engine, transaction
from stagegate.errors import ConflictError, PermanentError, RetryableError
from stagegate.events.announce import announce_applied
from stagegate.events.sink import EventSink
from stagegate.governance import endpoints
from stagegate.lifecycle.endpoint import EndpointSpec
from stagegate.lifecycle.stages import DeploymentRole
from stagegate.serving.backends.protocol import ServedVersion, ServingBackend
from stagegate.serving.policy import Arm, TrafficPolicy
from stagegate.steps.common import SERVICE

ATTEMPTS = 3  # the desired state may move on while servers start; then start over


@dataclass(frozen=True)
class DataPlane:
    """Where converge acts: the serving backend, the router whose reload it waits for, and
    the inference log that the shadow and canary reports read."""

    backend: ServingBackend
    router_url: str | None  # None: nothing to wait for (no router polls this database)
    device: str = "auto"
    reload_timeout_s: float = 15.0
    log_url: str | None = None  # None: reconcile cannot decide reports
    router_token: str | None = None  # the router's admin token, for its /policies


@dataclass
class ConvergeResult:
    model: str
    generation: int
    served: dict[str, tuple[int, str]] = field(default_factory=dict)  # role -> (version, url)
    removed: list[int] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)


def _route(model: str, spec: EndpointSpec, arms: dict[DeploymentRole, Arm]) -> TrafficPolicy | None:
    champion = arms.get(DeploymentRole.champion)
    if champion is None:  # nothing would answer clients: no route at all
        return None
    return TrafficPolicy(
        model=model,
        champion=champion,
        challenger=arms.get(DeploymentRole.challenger),
        challenger_weight=spec.challenger_weight,
        shadow=arms.get(DeploymentRole.shadow),
        shadow_fraction=spec.shadow_fraction,
        assignment_field=spec.assignment_field,
    )


def wait_for_router(
    router_url: str,
    model: str,
    generation: int,
    *,
    routed: bool,
    timeout_s: float,
    token: str | None = None,
) -> None:
    """Wait until the router serves `generation` of `model` (or, unrouted, no route for it)."""
    deadline = time.monotonic() + timeout_s
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    while True:
        try:
            url = f"{router_url}/policies"
            answer = httpx.get(url, headers=headers, timeout=2, trust_env=False)
            if answer.status_code == 401:  # a wrong or missing token does not fix itself
                raise PermanentError(
                    f"router at {router_url} refused its /policies: {answer.text[:200]} "
                    "(STAGEGATE_SERVING__ROUTER_ADMIN_TOKEN)"
                )
            doc = answer.json()
            have = next((p for p in doc.get("policies", []) if p.get("model") == model), None)
            served = None if have is None else int(have.get("generation", 0))
            # A newer generation than ours counts too: it replaced what we published.
            if routed and served is not None and served >= generation:
                return
            if not routed and (served is None or served > generation):
                return
        except (httpx.HTTPError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RetryableError(
                f"router at {router_url} does not serve generation {generation} of {model}"
            )
        time.sleep(0.1)


def _converge_once(engine: Engine, sink: EventSink, plane: DataPlane, model: str) -> ConvergeResult:
    with transaction(engine, read_only=True) as session:
        wanted = endpoints.find_endpoint(session, model)
    if wanted is None:  # recorded before endpoints existed: derive it now
        with transaction(engine) as session:
            wanted = endpoints.desire(session, model, actor=SERVICE.name)
    arms: dict[DeploymentRole, Arm] = {}
    urls: dict[str, tuple[int, str]] = {}
    for role, version in wanted.spec.arms.items():
        deployed = plane.backend.deploy(
            ServedVersion(
                model,
                version,
                f"models:/{model}/{version}",
                role=role,
                digest=wanted.spec.digests.get(version),
                device=plane.device,
            )
        )
        if deployed.url is None:
            raise RetryableError(f"{model} v{version} has no URL after deploy")
        arms[role] = Arm(version=version, url=deployed.url)
        urls[role.value] = (version, deployed.url)
    route = _route(model, wanted.spec, arms)
    with transaction(engine) as session:
        generation = endpoints.publish_route(
            session,
            model,
            generation=wanted.generation,
            route=None if route is None else route.model_dump(mode="json"),
            actor=SERVICE.name,
        )
    result = ConvergeResult(model, generation, urls)
    if plane.router_url is not None:
        wait_for_router(
            plane.router_url,
            model,
            generation,
            routed=route is not None,
            timeout_s=plane.reload_timeout_s,
            token=plane.router_token,
        )
    with transaction(engine, read_only=True) as session:
        # A newer desired state may already want a version this one dropped: keep those too.
        keep = wanted.spec.versions() | endpoints.get_endpoint(session, model).spec.versions()
    for deployment in plane.backend.list():
        if deployment.model == model and deployment.version not in keep:
            plane.backend.remove(model, deployment.version)
            result.removed.append(deployment.version)
    with transaction(engine) as session:
        endpoints.mark_converged(session, model, generation)
        pending = endpoints.unannounced(session, model, served=generation)
    for a in pending:
        sent = announce_applied(
            sink,
            transition_id=a.transition_id,
            model=a.model,
            version=a.version,
            from_stage=a.from_stage,
            to_stage=a.to_stage,
        )
        if sent:
            with transaction(engine) as session:
                endpoints.mark_announced(session, a.transition_id)
            result.announced.append(a.transition_id)
    return result


def converge(engine: Engine, sink: EventSink, plane: DataPlane, model: str) -> ConvergeResult:
    """Idempotent: run it as often as you like; it changes only what differs."""
    moved: ConflictError | None = None
    for _ in range(ATTEMPTS):
        try:
            return _converge_once(engine, sink, plane, model)
        except ConflictError as exc:
            moved = exc
    assert moved is not None
    raise RetryableError(f"endpoint {model} kept changing while converging: {moved.detail}")
