"""One desired state per endpoint, written with the stage move, and one converge path.

The serving backend is a fake at our own `ServingBackend` boundary (real model servers are
tested in test_local_backend.py and end to end); the router in the last test is the real
`stagegate router` process polling the real API.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from stagegate.db import transaction, utcnow
from stagegate.errors import RetryableError
from stagegate.events.announce import announce_applied
from stagegate.events.sink import MemorySink, OutEvent
from stagegate.governance import endpoints, transitions
from stagegate.governance.models import TransitionStatus
from stagegate.governance.policies import get_policy, set_policy
from stagegate.governance.tokens import Principal
from stagegate.lifecycle.stages import DeploymentRole, Role, Stage
from stagegate.serving.backends.protocol import ServedVersion
from stagegate.steps.apply import apply_transition
from stagegate.steps.converge import DataPlane, converge
from stagegate.steps.intake import intake
from stagegate.steps.reconcile import reconcile
from tests.factories import Factory
from tests.fakes import FakeBackend, FakeRegistry
from tests.fixtures.mlflow_server import free_port
from tests.fixtures.router_process import router_process

ALICE = Principal("alice", Role.approver)
BOB = Principal("bob", Role.approver)
ERIN = Principal("erin", Role.author)


class LossySink(MemorySink):
    """Prefect is down: every emit fails as the real sink's would."""

    def emit(self, event: OutEvent) -> None:
        raise RetryableError("prefect unreachable")


def _move(engine: Engine, reg: FakeRegistry, version: int, to: Stage) -> str:
    """Request, approve and apply one move."""
    with transaction(engine) as s:
        t, _ = transitions.request(
            s, principal=ERIN, model="fraud", version=version, to_stage=to, reason="x", now=utcnow()
        )
    _approve_and_apply(engine, reg, t.id)
    return t.id


def _no_report_gates(engine: Engine) -> None:
    """Shadow and canary reports are tested elsewhere; here only the endpoint matters."""
    with transaction(engine) as s:
        policy = get_policy(s, "fraud")
        relaxed = policy.model_copy(
            update={
                "shadow": policy.shadow.model_copy(update={"required": False}),
                "canary": policy.canary.model_copy(update={"required": False}),
            }
        )
        set_policy(s, "*", relaxed, actor="test")


@pytest.fixture
def reg(engine: Engine, sink: MemorySink) -> FakeRegistry:
    _no_report_gates(engine)
    reg = FakeRegistry()
    for v in (1, 2):
        reg.add("fraud", v)
        intake(engine, reg, sink, "fraud", v)
    return reg


def _opened(engine: Engine, version: int) -> str:
    with transaction(engine) as s:
        pending = transitions.list_transitions(
            s, model="fraud", status=TransitionStatus.pending, offset=0, limit=100
        )
    return next(t.id for t in pending if t.version == version)


def _approve_and_apply(engine: Engine, reg: FakeRegistry, tid: str) -> None:
    """Approvals until the policy is satisfied (production wants two people), then apply."""
    for person in (ALICE, BOB):
        with transaction(engine) as s:
            t = transitions.decide(
                s,
                principal=person,
                transition_id=tid,
                decision="approve",
                comment=None,
                now=utcnow(),
            )
        if t.status is not TransitionStatus.pending:
            break
    assert apply_transition(engine, reg, tid, backend="fake").status is TransitionStatus.applied


def _walk_v1_to_production(engine: Engine, reg: FakeRegistry) -> None:
    _approve_and_apply(engine, reg, _opened(engine, 1))  # v1 -> shadow (opened by intake)
    _move(engine, reg, 1, Stage.canary)
    _move(engine, reg, 1, Stage.production)


def test_the_stage_move_writes_the_desired_state_in_its_own_transaction(
    engine: Engine, reg: FakeRegistry
) -> None:
    tid = _opened(engine, 1)
    with transaction(engine) as s:
        before = endpoints.find_endpoint(s, "fraud")
    _approve_and_apply(engine, reg, tid)
    with transaction(engine) as s:
        after = endpoints.get_endpoint(s, "fraud")
        t = transitions.get_transition(s, tid)
    assert after.spec.arms == {DeploymentRole.shadow: 1}
    assert after.generation == (before.generation if before else 0) + 1
    assert t.generation == after.generation
    assert t.announced_at is None  # nothing serves it yet: converge announces
    assert after.route is None
    assert not after.converged


def test_converge_serves_routes_removes_then_announces_and_is_idempotent(
    engine: Engine, reg: FakeRegistry, sink: MemorySink
) -> None:
    backend = FakeBackend()
    plane = DataPlane(backend, router_url=None)
    _walk_v1_to_production(engine, reg)
    first = converge(engine, sink, plane, "fraud")
    assert first.served == {"champion": (1, "http://127.0.0.1:7001")}
    # The server is told the digest v1 was approved with (intake recorded it).
    assert backend.deploy_calls[-1].digest == reg.digests[("fraud", 1)]
    applied = [e for e in sink.events if e.event == "stagegate.transition.applied"]
    assert [e.payload["to_stage"] for e in applied] == ["shadow", "canary", "production"]
    with transaction(engine) as s:
        state = endpoints.get_endpoint(s, "fraud")
        assert endpoints.routes(s) == [state.route]
    assert state.converged
    assert state.route is not None
    assert state.route["generation"] == state.generation
    assert state.route["champion"]["url"] == "http://127.0.0.1:7001/"

    # v2 enters shadow: a new generation; v1 keeps serving, v2 joins as the shadow.
    _approve_and_apply(engine, reg, _opened(engine, 2))
    second = converge(engine, sink, plane, "fraud")
    assert second.generation == state.generation + 1
    assert second.served["shadow"][0] == 2
    assert second.removed == []
    # v1 is rolled back from production: v2's shadow stays, v1's server goes, no route.
    _move(engine, reg, 1, Stage.rolled_back)
    third = converge(engine, sink, plane, "fraud")
    assert third.removed == [1]
    assert set(backend.servers) == {("fraud", 2)}
    with transaction(engine) as s:
        assert endpoints.get_endpoint(s, "fraud").route is None
        assert endpoints.routes(s) == []

    # Nothing changed: converging again deploys the same, announces nothing new.
    events = len(sink.events)
    again = converge(engine, sink, plane, "fraud")
    assert again.generation == third.generation
    assert again.announced == []
    assert len(sink.events) == events


def test_a_lost_applied_event_is_repaired_by_the_next_converge(
    engine: Engine, reg: FakeRegistry, sink: MemorySink
) -> None:
    plane = DataPlane(FakeBackend(), router_url=None)
    tid = _opened(engine, 1)
    _approve_and_apply(engine, reg, tid)
    lost = converge(engine, LossySink(), plane, "fraud")  # served, but Prefect was down
    assert lost.announced == []
    with transaction(engine) as s:
        assert transitions.get_transition(s, tid).announced_at is None
        assert endpoints.to_converge(s) == ["fraud"]

    report = reconcile(engine, reg, sink, plane, stale_after_s=3600)
    assert report.endpoints == ["fraud"]
    applied = [e for e in sink.events if e.event == "stagegate.transition.applied"]
    assert [e.payload["transition_id"] for e in applied] == [tid]
    assert applied[0].payload["to_stage"] == "shadow"
    with transaction(engine) as s:
        assert transitions.get_transition(s, tid).announced_at is not None
    reconcile(engine, reg, sink, plane, stale_after_s=3600)  # once only
    assert len([e for e in sink.events if e.event == "stagegate.transition.applied"]) == 1


def test_an_applied_announcement_has_one_id_so_prefect_drops_a_racing_duplicate() -> None:
    def sent(tid: str) -> str:
        sink = MemorySink()
        announce_applied(
            sink, transition_id=tid, model="m", version=1, from_stage="a", to_stage="b"
        )
        return sink.events[0].id

    assert sent("t1") == sent("t1")
    assert sent("t1") != sent("t2")


def test_a_server_back_on_another_port_is_a_new_generation(
    engine: Engine, reg: FakeRegistry, sink: MemorySink
) -> None:
    backend = FakeBackend()
    plane = DataPlane(backend, router_url=None)
    _walk_v1_to_production(engine, reg)
    before = converge(engine, sink, plane, "fraud")
    backend.restart("fraud", 1)  # the local server crashed and came back elsewhere
    after = converge(engine, sink, plane, "fraud")
    assert after.generation == before.generation + 1
    with transaction(engine) as s:
        route = endpoints.get_endpoint(s, "fraud").route
    assert route is not None
    assert route["champion"]["url"] == f"{backend.servers[('fraud', 1)].url}/"


def test_converge_starts_over_when_the_desired_state_moves_meanwhile(
    engine: Engine, reg: FakeRegistry, sink: MemorySink
) -> None:
    """A stage move committed while servers start: the stale route is never published."""
    backend = FakeBackend()
    plane = DataPlane(backend, router_url=None)
    _walk_v1_to_production(engine, reg)
    shadow_tid = _opened(engine, 2)
    moved: list[int] = []

    def move_v2_once(served: ServedVersion) -> None:
        if not moved:
            moved.append(served.version)
            _approve_and_apply(engine, reg, shadow_tid)

    backend.on_deploy = move_v2_once
    result = converge(engine, sink, plane, "fraud")
    assert moved == [1]
    assert result.served["shadow"][0] == 2  # built from the newer state, not the stale one
    with transaction(engine) as s:
        state = endpoints.get_endpoint(s, "fraud")
    assert state.converged
    assert state.route is not None
    assert state.route["shadow"]["version"] == 2


def test_a_traffic_policy_change_is_a_new_desired_state(
    engine: Engine, reg: FakeRegistry, sink: MemorySink
) -> None:
    _approve_and_apply(engine, reg, _opened(engine, 1))
    with transaction(engine) as s:
        before = endpoints.get_endpoint(s, "fraud")
        policy = get_policy(s, "fraud")
        traffic = policy.traffic.model_copy(update={"shadow_fraction": 0.25})
        set_policy(s, "fraud", policy.model_copy(update={"traffic": traffic}), actor="admin")
    with transaction(engine) as s:
        after = endpoints.get_endpoint(s, "fraud")
    assert after.generation == before.generation + 1
    assert after.spec.shadow_fraction == 0.25


@pytest.fixture
def router(live_api_url: str, factory: Factory, tmp_path: Path) -> Iterator[str]:
    """The real router process, polling the API for its policies as routers in any pod do."""
    token = factory.token("router", "service")["Authorization"].removeprefix("Bearer ")
    with router_process(live_api_url, token, tmp_path / "router.log") as url:
        yield url


@pytest.mark.slow
def test_converge_waits_until_the_router_serves_the_generation(
    engine: Engine, reg: FakeRegistry, sink: MemorySink, router: str
) -> None:
    """Database -> API -> router: no file in between; removal waits for the router."""
    backend = FakeBackend()
    plane = DataPlane(backend, router_url=router, reload_timeout_s=10)
    _walk_v1_to_production(engine, reg)
    first = converge(engine, sink, plane, "fraud")
    served = httpx.get(f"{router}/policies", trust_env=False).json()["policies"]
    assert [(p["model"], p["generation"], p["champion"]["version"]) for p in served] == [
        ("fraud", first.generation, 1)
    ]
    _approve_and_apply(engine, reg, _opened(engine, 2))  # v2 -> shadow
    second = converge(engine, sink, plane, "fraud")
    served = httpx.get(f"{router}/policies", trust_env=False).json()["policies"]
    assert served[0]["generation"] == second.generation
    assert served[0]["shadow"]["version"] == 2

    # A router that never gets there: converge fails (retryable) and removes nothing.
    _move(engine, reg, 2, Stage.rejected)
    dead = DataPlane(backend, router_url=f"http://127.0.0.1:{free_port()}", reload_timeout_s=0.5)
    with pytest.raises(RetryableError, match="does not serve generation"):
        converge(engine, sink, dead, "fraud")
    assert ("fraud", 2) in backend.servers
    with transaction(engine) as s:
        assert not endpoints.get_endpoint(s, "fraud").converged
    # Once the router is back, the same converge finishes the job.
    assert converge(engine, sink, plane, "fraud").removed == [2]


def test_the_endpoint_api_shows_desired_state_and_convergence(
    engine: Engine, reg: FakeRegistry, sink: MemorySink, client: TestClient, factory: Factory
) -> None:
    viewer = factory.token("vic", "viewer")
    assert client.get("/api/v1/models/fraud/endpoint", headers=viewer).status_code == 404
    _approve_and_apply(engine, reg, _opened(engine, 1))
    pending = client.get("/api/v1/models/fraud/endpoint", headers=viewer).json()
    assert pending["spec"]["arms"] == {"shadow": 1}
    assert pending["converged"] is False
    assert pending["route"] is None
    converge(engine, sink, DataPlane(FakeBackend(), router_url=None), "fraud")
    done = client.get("/api/v1/models/fraud/endpoint", headers=viewer).json()
    assert done["converged"] is True
    assert done["converged_generation"] == done["generation"] == pending["generation"]
    assert client.get("/api/v1/models/fraud/endpoint").status_code == 401
    assert client.get("/api/v1/models/nope/endpoint", headers=viewer).status_code == 404
