"""The Kubernetes backend's apply, wait, observe and remove, against the in-memory API.

No Kubernetes API server can run on these machines (docs/kubernetes.md). `tests/kube_fake.py`
implements our own `KubeClient` protocol with the server behaviour the logic depends on:
resourceVersion, 409/404/422, defaults, and a scripted Deployment controller.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, Configuration
from sqlalchemy.engine import Engine

from stagegate import runtime
from stagegate.db import transaction
from stagegate.errors import PermanentError, RetryableError
from stagegate.events.sink import MemorySink
from stagegate.governance import endpoints, policies
from stagegate.lifecycle.policy import default_policy
from stagegate.lifecycle.serving_spec import ServingSpec
from stagegate.lifecycle.stages import DeploymentRole, Stage
from stagegate.serving.backends.kubernetes import (
    Cluster,
    KubernetesBackend,
    Ref,
    RolloutNotReady,
    builders,
)
from stagegate.serving.backends.kubernetes.backend import CONFLICT_ATTEMPTS
from stagegate.serving.backends.kubernetes.live import LiveClient
from stagegate.serving.backends.protocol import ServedVersion, ServingBackend
from stagegate.steps.converge import DataPlane
from stagegate.steps.reconcile import reconcile
from stagegate.steps.retry import only_retryable
from tests.factories import Factory
from tests.fakes import FakeRegistry
from tests.kube_fake import FakeKube, Rollout, WireServer

NS = "stagegate"
TIMEOUT_S = 60.0
GPU = ServingSpec(
    gpus=1,
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
)
HPA = ServingSpec(autoscaling={"min_replicas": 2, "max_replicas": 5})


@dataclass
class Clock:
    """Monotonic time that passes only when the backend sleeps between polls."""

    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class World:
    kube: FakeKube
    clock: Clock
    specs: dict[str, ServingSpec]
    backend: KubernetesBackend

    def objects(self, name: str) -> dict[str, dict[str, Any]]:
        return {k[1]: o for k, o in self.kube.objects.items() if k[3] == name}


@pytest.fixture
def world() -> World:
    kube, clock, specs = FakeKube(), Clock(), {}
    backend = KubernetesBackend(
        kube,
        Cluster(namespace=NS),
        lambda model: specs.get(model, ServingSpec()),
        poll_s=2.0,
        rollout_timeout_s=TIMEOUT_S,
        clock=clock.time,
        sleep=clock.sleep,
    )
    return World(kube, clock, specs, backend)


def served(
    model: str = "fraud",
    version: int = 3,
    digest: str | None = "a" * 64,
    role: DeploymentRole = DeploymentRole.champion,
) -> ServedVersion:
    return ServedVersion(model, version, f"models:/{model}/{version}", role=role, digest=digest)


def deployment_ref(name: str = "fraud-v3") -> Ref:
    return Ref("apps/v1", "Deployment", NS, name)


def test_it_is_a_serving_backend(world: World) -> None:
    backend: ServingBackend = world.backend  # the same protocol the local backend implements
    assert backend.name == "kubernetes"


# -- apply ---------------------------------------------------------------------------------


def test_a_first_deploy_creates_every_object_and_serves_the_service_url(world: World) -> None:
    world.specs["fraud"] = HPA
    state = world.backend.deploy(served())
    assert state.healthy
    assert state.running
    assert state.url == "http://fraud-v3.stagegate.svc.cluster.local"
    assert (state.key, state.model, state.version) == ("fraud-v3", "fraud", 3)
    objects = world.objects("fraud-v3")
    assert set(objects) == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for obj in objects.values():
        assert obj["metadata"]["managedFields"] == [{"manager": "stagegate", "operation": "Apply"}]
    assert sorted(w[1] for w in world.kube.writes()) == sorted(objects)
    assert all(w[0] == "apply" for w in world.kube.writes())


def test_a_second_deploy_writes_nothing(world: World) -> None:
    world.specs["fraud"] = GPU
    world.backend.deploy(served())
    versions = {k: o["metadata"]["resourceVersion"] for k, o in world.kube.objects.items()}
    writes = len(world.kube.writes())
    again = world.backend.deploy(served())
    assert again.healthy
    assert len(world.kube.writes()) == writes  # observed, found equal, left alone
    assert {k: o["metadata"]["resourceVersion"] for k, o in world.kube.objects.items()} == versions
    for manifest in builders.manifests(served(), GPU, world.backend.cluster):
        assert world.backend.apply(manifest) == "unchanged"


def test_a_changed_spec_patches_only_what_changed(world: World) -> None:
    world.backend.deploy(served())
    before = world.objects("fraud-v3")
    world.specs["fraud"] = ServingSpec(replicas=2, resources={"memory": "1536Mi"})
    world.backend.deploy(served(digest="b" * 64))
    after = world.objects("fraud-v3")
    deployment = after["Deployment"]
    assert deployment["metadata"]["uid"] == before["Deployment"]["metadata"]["uid"]  # patched
    assert deployment["metadata"]["generation"] == 2
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--expect-digest") + 1] == "b" * 64
    assert after["Service"] == before["Service"]  # unchanged, not rewritten
    patched = [w[1] for w in world.kube.writes()[len(before) :]]
    assert patched == ["Deployment"]


def test_a_promotion_relabels_without_restarting_pods(world: World) -> None:
    world.backend.deploy(served(role=DeploymentRole.challenger))
    pods = {k for k in world.kube.objects if k[1] == "Pod"}
    world.backend.deploy(served(role=DeploymentRole.champion))
    deployment = world.objects("fraud-v3")["Deployment"]
    assert deployment["metadata"]["labels"]["stagegate.io/role"] == "champion"
    assert deployment["metadata"]["generation"] == 1  # the spec did not change
    assert {k for k in world.kube.objects if k[1] == "Pod"} == pods


def test_a_conflict_is_retried_from_a_fresh_read(world: World) -> None:
    world.backend.deploy(served())
    world.specs["fraud"] = ServingSpec(replicas=2)
    world.kube.race(deployment_ref(), times=2)  # someone writes between our read and write
    world.backend.deploy(served())
    assert world.kube.conflicts_answered == 2
    deployment = world.objects("fraud-v3")["Deployment"]
    assert deployment["spec"]["replicas"] == 2


def test_a_conflict_that_never_ends_is_retryable(world: World) -> None:
    world.backend.deploy(served())
    world.specs["fraud"] = ServingSpec(replicas=2)
    world.kube.race(deployment_ref(), times=CONFLICT_ATTEMPTS)
    with pytest.raises(RetryableError, match="kept changing"):
        world.backend.deploy(served())
    assert world.kube.conflicts_answered == CONFLICT_ATTEMPTS


def test_an_invalid_object_is_a_permanent_error_with_the_servers_reason(world: World) -> None:
    # The policy allows any affinity object; the API server checks its fields (422).
    world.specs["fraud"] = ServingSpec(affinity={"nodeAffinity": {"requiredDuring": {}}})
    with pytest.raises(PermanentError, match=r"\(422\): Deployment is invalid"):
        world.backend.deploy(served())
    assert "Deployment" not in world.objects("fraud-v3")


def test_an_object_we_do_not_own_is_never_adopted(world: World) -> None:
    theirs = builders.service(served(), world.backend.cluster)
    theirs["metadata"]["labels"] = {"app": "someone-else"}
    world.kube.put(theirs)
    with pytest.raises(PermanentError, match="not managed by Stagegate"):
        world.backend.deploy(served())
    assert world.objects("fraud-v3")["Service"]["metadata"]["labels"] == {"app": "someone-else"}


def test_gpu_values_reach_the_pod_spec(world: World) -> None:
    world.specs["fraud"] = GPU
    world.backend.deploy(served())
    pods = [o for k, o in world.kube.objects.items() if k[1] == "Pod"]
    assert pods
    for pod in pods:  # made by the fake controller from the applied template
        spec = pod["spec"]
        (server,) = spec["containers"]
        assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert server["args"][server["args"].index("--device") + 1] == "cuda"
        assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]


def test_the_hpas_replica_count_is_kept_and_switching_it_off_removes_the_hpa(
    world: World,
) -> None:
    world.specs["fraud"] = HPA
    world.backend.deploy(served())
    stored = world.kube.objects[("apps/v1", "Deployment", NS, "fraud-v3")]
    stored["spec"]["replicas"] = 4  # the HPA scaled up
    writes = len(world.kube.writes())
    world.backend.deploy(served())
    assert len(world.kube.writes()) == writes
    assert world.objects("fraud-v3")["Deployment"]["spec"]["replicas"] == 4

    world.specs["fraud"] = ServingSpec(replicas=3)
    world.backend.deploy(served())
    objects = world.objects("fraud-v3")
    assert "HorizontalPodAutoscaler" not in objects
    assert objects["Deployment"]["spec"]["replicas"] == 3


# -- rollouts ------------------------------------------------------------------------------


def test_deploy_waits_for_the_rollout(world: World) -> None:
    world.kube.script("fraud-v3", Rollout(ready_after_reads=4))
    state = world.backend.deploy(served())
    assert state.healthy
    assert world.clock.sleeps  # it polled
    assert all(s == 2.0 for s in world.clock.sleeps)


STUCK = {
    "ImagePullBackOff": {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "model-server",
                "ready": False,
                "state": {
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": 'Back-off pulling image "stagegate:typo"',
                    }
                },
            }
        ],
    },
    "Insufficient nvidia.com/gpu": {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    },
    "CrashLoopBackOff": {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": "model-server",
                "ready": False,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
                "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
            }
        ],
    },
}


@pytest.mark.parametrize("reason", sorted(STUCK))
def test_a_stuck_rollout_raises_a_retryable_error_with_the_pods_reason(
    world: World, reason: str
) -> None:
    world.specs["fraud"] = GPU
    world.kube.script("fraud-v3", Rollout(ready_after_reads=None, pod_status=STUCK[reason]))
    started = world.clock.now
    with pytest.raises(RolloutNotReady) as caught:
        world.backend.deploy(served())
    assert reason in str(caught.value)
    assert any(reason in r for r in caught.value.reasons)
    assert world.clock.now - started >= TIMEOUT_S  # it waited the whole timeout
    # The kind of error Prefect's task retries and reconcile's next pass retry.
    assert isinstance(caught.value, RetryableError)
    assert only_retryable(None, None, _Failed(caught.value))
    state = world.backend.observe("fraud", 3)
    assert state is not None
    assert not state.healthy


def test_a_deadline_exceeded_rollout_fails_at_once(world: World) -> None:
    stuck = Rollout(ready_after_reads=None, pod_status=STUCK["CrashLoopBackOff"])
    stuck.deadline_exceeded = True
    world.kube.script("fraud-v3", stuck)
    with pytest.raises(RolloutNotReady, match="timed out progressing"):
        world.backend.deploy(served())
    assert world.clock.sleeps == []  # no point in waiting out the timeout


@dataclass
class _Failed:
    """A Prefect task state whose result raises, as `only_retryable` sees one."""

    error: Exception

    def result(self) -> None:
        raise self.error


def test_reconcile_retries_a_stuck_rollout_until_it_serves(
    engine: Engine, factory: Factory, world: World
) -> None:
    """Converge (what promote and reconcile run) on the Kubernetes backend, with the serving
    spec read from the model's policy in the database."""
    factory.version("fraud", 3)
    factory.place("fraud", 3, Stage.production)
    with transaction(engine) as s:
        policy = default_policy().model_copy(update={"serving": GPU})
        policies.set_policy(s, "fraud", policy, actor="test")
        endpoints.desire(s, "fraud", actor="test")
    backend = KubernetesBackend(
        world.kube,
        Cluster(namespace=NS),
        runtime.serving_specs(engine),
        rollout_timeout_s=TIMEOUT_S,
        clock=world.clock.time,
        sleep=world.clock.sleep,
    )
    plane = DataPlane(backend, router_url=None)
    registry, sink = FakeRegistry(), MemorySink()
    registry.add("fraud", 3)
    world.kube.script(
        "fraud-v3", Rollout(ready_after_reads=None, pod_status=STUCK["ImagePullBackOff"])
    )

    first = reconcile(engine, registry, sink, plane, stale_after_s=3600)
    assert any("ImagePullBackOff" in e for e in first.errors)
    with transaction(engine) as s:
        assert endpoints.get_endpoint(s, "fraud").route is None

    world.kube.script("fraud-v3", Rollout())  # the image was pushed
    second = reconcile(engine, registry, sink, plane, stale_after_s=3600)
    assert second.endpoints == ["fraud"]
    with transaction(engine) as s:
        route = endpoints.get_endpoint(s, "fraud").route
    assert route is not None
    assert route["champion"]["url"].startswith("http://fraud-v3.stagegate.svc.cluster.local")
    pod = next(o for k, o in world.kube.objects.items() if k[1] == "Pod")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"


# -- observe, list, remove -------------------------------------------------------------------


def test_observe_and_remove_of_a_version_never_deployed(world: World) -> None:
    assert world.backend.observe("fraud", 3) is None
    assert world.backend.remove("fraud", 3) is False
    assert world.kube.writes() == []


def test_list_reports_our_deployments_under_their_real_names(world: World) -> None:
    world.backend.deploy(served("Fraud Detector", 1))
    world.backend.deploy(served("fraud", 2))
    theirs = builders.deployment(served("fraud", 9), ServingSpec(), world.backend.cluster)
    theirs["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
    world.kube.put(theirs)
    listed = sorted((s.model, s.version, s.healthy) for s in world.backend.list())
    assert listed == [("Fraud Detector", 1, True), ("fraud", 2, True)]


def test_remove_deletes_only_that_versions_objects_that_we_own(world: World) -> None:
    world.specs["fraud"] = HPA
    for version in (3, 4):
        world.backend.deploy(served("fraud", version))
    world.backend.deploy(served("fraud-x", 3))
    # Same model and version labels, another owner: a selector mistake must not delete it.
    theirs = builders.service(served("fraud", 3), world.backend.cluster)
    theirs["metadata"]["name"] = "fraud-v3-debug"
    theirs["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "kubectl"
    world.kube.put(theirs)
    before = set(world.kube.objects)

    assert world.backend.remove("fraud", 3) is True
    gone = before - set(world.kube.objects)
    assert {k[3] for k in gone if k[1] != "Pod"} == {"fraud-v3"}
    assert {k[1] for k in gone} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Pod",
    }
    assert ("v1", "Service", NS, "fraud-v3-debug") in world.kube.objects
    assert world.backend.observe("fraud", 4) is not None
    assert world.backend.observe("fraud-x", 3) is not None
    assert world.backend.observe("fraud", 3) is None
    assert world.backend.remove("fraud", 3) is False  # idempotent


def test_remove_rechecks_ownership_after_a_conflict(world: World) -> None:
    """A 409 on delete means someone changed the object: it is read again, and left alone if
    it is no longer ours."""
    world.backend.deploy(served())
    ref = Ref("v1", "Service", NS, "fraud-v3")
    stored = world.kube.objects[("v1", "Service", NS, "fraud-v3")]

    def taken_over() -> None:
        stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] = "Helm"
        stored["metadata"]["resourceVersion"] = "999999"

    world.kube.before_next_write(ref, taken_over)
    world.backend.remove("fraud", 3)
    assert world.kube.get(ref) is not None  # Helm's now
    assert world.backend.observe("fraud", 3) is None


# -- the live client, on the wire ------------------------------------------------------------
# `live.py` is never run against a real API server here; these run it over HTTP against the
# same fake, to pin down what it sends: server-side apply, field manager, force, the
# resourceVersion precondition, label selectors, and how answers become errors.


@pytest.fixture
def wire(tmp_path: Path) -> Iterator[tuple[WireServer, LiveClient]]:
    with WireServer(FakeKube()) as server:
        api = ApiClient(Configuration(host=server.url))
        yield server, LiveClient(api, discovery_cache=tmp_path / "discovery.json")


def live_backend(client: LiveClient, clock: Clock, spec: ServingSpec) -> KubernetesBackend:
    return KubernetesBackend(
        client,
        Cluster(namespace=NS),
        lambda _: spec,
        rollout_timeout_s=TIMEOUT_S,
        clock=clock.time,
        sleep=clock.sleep,
    )


def test_the_live_client_applies_server_side_with_our_field_manager(
    wire: tuple[WireServer, LiveClient],
) -> None:
    server, client = wire
    backend = live_backend(client, Clock(), GPU)
    state = backend.deploy(served())
    assert state.healthy
    patches = [c for c in server.calls if c.method == "PATCH"]
    assert {c.path for c in patches} == {
        f"/api/v1/namespaces/{NS}/services/fraud-v3",
        f"/apis/apps/v1/namespaces/{NS}/deployments/fraud-v3",
        f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/fraud-v3",
    }
    for call in patches:
        assert call.content_type == "application/apply-patch+yaml"
        assert call.query == {"fieldManager": "stagegate", "force": "true"}
        assert "resourceVersion" not in call.body["metadata"]  # a create is unconditional
    stored = server.fake.objects[("apps/v1", "Deployment", NS, "fraud-v3")]
    limits = stored["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"

    # Again: reads only. Then a change: one conditional patch.
    before = len(server.calls)
    backend.deploy(served())
    assert all(c.method == "GET" for c in server.calls[before:])
    live_backend(client, Clock(), ServingSpec(replicas=2)).deploy(served())
    patched = [c for c in server.calls[before:] if c.method == "PATCH"]
    assert [c.path.rsplit("/", 2)[1] for c in patched] == ["deployments"]
    assert patched[0].body["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]


def test_the_live_client_maps_answers_to_errors(wire: tuple[WireServer, LiveClient]) -> None:
    server, client = wire
    assert client.get(Ref("apps/v1", "Deployment", NS, "nothing")) is None  # 404
    assert client.delete(Ref("v1", "Service", NS, "nothing")) is False
    bad = live_backend(client, Clock(), ServingSpec(affinity={"nodeAffinity": {"x": 1}}))
    with pytest.raises(PermanentError, match=r"\(422\): Deployment is invalid"):
        bad.deploy(served())
    backend = live_backend(client, Clock(), ServingSpec())
    backend.deploy(served())
    server.fake.race(deployment_ref())
    live_backend(client, Clock(), ServingSpec(replicas=3)).deploy(served())
    assert server.fake.conflicts_answered == 1  # a 409 on the wire, retried
    assert server.fake.objects[("apps/v1", "Deployment", NS, "fraud-v3")]["spec"]["replicas"] == 3


def test_the_live_client_removes_by_label_with_preconditions(
    wire: tuple[WireServer, LiveClient],
) -> None:
    server, client = wire
    backend = live_backend(client, Clock(), ServingSpec())
    backend.deploy(served())
    assert [(s.model, s.version) for s in backend.list()] == [("fraud", 3)]
    assert backend.remove("fraud", 3) is True
    lists = [c for c in server.calls if c.method == "GET" and "labelSelector" in c.query]
    assert all("app.kubernetes.io/managed-by=stagegate" in c.query["labelSelector"] for c in lists)
    deletes = [c for c in server.calls if c.method == "DELETE"]
    assert len(deletes) == 3
    for call in deletes:
        assert call.body["propagationPolicy"] == "Background"
        assert call.body["preconditions"]["resourceVersion"]
    assert backend.observe("fraud", 3) is None


def test_an_unreachable_api_server_is_retryable(tmp_path: Path) -> None:
    with WireServer(FakeKube()) as server:
        url = server.url  # closed on leaving: nothing listens there any more
    api = ApiClient(Configuration(host=url))
    client = LiveClient(api, discovery_cache=tmp_path / "discovery.json")
    with pytest.raises(RetryableError, match="no answer"):
        live_backend(client, Clock(), ServingSpec()).observe("fraud", 3)
