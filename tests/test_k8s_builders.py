"""The Kubernetes manifest builders: pure functions, checked against the official schemas.

No API server can run here; every manifest is validated in strict mode (unknown fields are
errors) against the Kubernetes 1.30 and 1.37 schemas that kubernetes-validate ships.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import kubernetes_validate.utils as kv
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from typer.testing import CliRunner, Result

from stagegate.cli import app
from stagegate.db import transaction
from stagegate.errors import InvalidInput
from stagegate.governance import endpoints, policies
from stagegate.lifecycle.endpoint import EndpointSpec
from stagegate.lifecycle.policy import Policy, default_policy
from stagegate.lifecycle.serving_spec import ServingSpec, quantity_value
from stagegate.lifecycle.stages import DeploymentRole, Stage
from stagegate.serving.backends.kubernetes import builders, names
from stagegate.serving.backends.kubernetes.builders import Cluster, Gateway
from stagegate.serving.backends.protocol import ServedVersion
from stagegate.settings import get_settings
from tests.factories import Factory

SCHEMAS = ["1.30.0", "1.37.0"]
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
DIGEST = "a" * 64

GPU_SPEC = ServingSpec(
    image="registry.example.com/models/fraud@sha256:" + "b" * 64,
    gpus=2,
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    affinity={
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"stagegate.io/role": "champion"}},
                    },
                }
            ]
        }
    },
    resources={"cpu": "2", "memory": "8Gi", "cpu_limit": "4", "memory_limit": "16Gi"},
    autoscaling={"min_replicas": 2, "max_replicas": 6, "target_cpu_percent": 60},
    max_unavailable=1,
)
SPECS = {"default": ServingSpec(), "gpu-hpa": GPU_SPEC, "fixed-3": ServingSpec(replicas=3)}
MODELS = ["fraud", "9 Lives_of ünïcode/模型 " + "x" * 120]  # clean; everything k8s refuses


def served(
    model: str = "fraud",
    version: int = 3,
    role: DeploymentRole = DeploymentRole.champion,
    digest: str | None = DIGEST,
) -> ServedVersion:
    return ServedVersion(model, version, f"models:/{model}/{version}", role=role, digest=digest)


def by_kind(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["kind"]: m for m in manifests}


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


# -- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("model", MODELS)
def test_every_manifest_validates_in_strict_mode(schema: str, spec_name: str, model: str) -> None:
    made = builders.manifests(served(model), SPECS[spec_name], Cluster())
    assert {m["kind"] for m in made} >= {"Deployment", "Service", "PodDisruptionBudget"}
    for manifest in made:
        assert kv.validate(manifest, schema, strict=True) == schema.rsplit(".", 1)[0]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_strict_validation_catches_a_misspelt_field(schema: str) -> None:
    """The check above is worth something: an unknown field fails it."""
    deployment = builders.deployment(served(), ServingSpec(), Cluster())
    deployment["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, schema, strict=True)


# -- names and labels ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(model=st.text(min_size=1, max_size=200), version=st.integers(0, 10**6))
def test_any_model_name_gives_dns_safe_names_and_label_values(model: str, version: int) -> None:
    name = names.object_name(model, version)
    assert len(name) <= 63
    assert DNS_1035.match(name), name
    for value in names.object_labels(model, version, "champion").values():
        assert len(value) <= 63
        assert LABEL_VALUE.match(value), value


@settings(max_examples=200, deadline=None)
@given(a=st.text(min_size=1, max_size=80), b=st.text(min_size=1, max_size=80))
def test_different_models_never_share_object_names(a: str, b: str) -> None:
    if a != b:
        assert names.model_slug(a) != names.model_slug(b)


def test_a_clean_name_is_kept_and_a_changed_one_gets_a_hash() -> None:
    assert names.object_name("fraud", 3) == "fraud-v3"
    assert names.model_slug("Fraud") != names.model_slug("fraud")
    assert names.model_slug("Fraud").startswith("fraud-")
    assert names.model_slug("9lives").startswith("m-9lives-")


def test_labels_mark_ownership_model_version_and_role_and_keep_the_real_name() -> None:
    model = "Fraud Detector_v2.1"
    made = builders.manifests(served(model, 7, DeploymentRole.challenger), GPU_SPEC, Cluster())
    for m in made:
        labels = m["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "stagegate"
        assert labels["app.kubernetes.io/part-of"] == "stagegate"
        assert labels["app.kubernetes.io/component"] == "model-server"
        assert labels["app.kubernetes.io/name"] == "stagegate-model-server"
        assert labels["app.kubernetes.io/instance"] == m["metadata"]["name"]
        assert labels["stagegate.io/model"] == names.model_slug(model)
        assert labels["stagegate.io/version"] == "7"
        assert labels["stagegate.io/role"] == "challenger"
        assert m["metadata"]["annotations"]["stagegate.io/model-name"] == model
        assert m["metadata"]["namespace"] == "stagegate"


def test_a_role_change_leaves_the_pod_template_alone() -> None:
    """Promotion relabels the objects; a changed template would restart serving pods."""
    as_challenger = builders.deployment(served(role=DeploymentRole.challenger), GPU_SPEC, Cluster())
    as_champion = builders.deployment(served(role=DeploymentRole.champion), GPU_SPEC, Cluster())
    assert as_challenger["spec"]["template"] == as_champion["spec"]["template"]
    assert as_challenger["metadata"] != as_champion["metadata"]
    assert "stagegate.io/role" not in as_champion["spec"]["template"]["metadata"]["labels"]


def test_service_pdb_and_hpa_select_the_deployments_pods_and_only_those() -> None:
    made = by_kind(builders.manifests(served(version=3), GPU_SPEC, Cluster()))
    other = builders.deployment(served(version=4), GPU_SPEC, Cluster())
    pod_labels = made["Deployment"]["spec"]["template"]["metadata"]["labels"]
    other_labels = other["spec"]["template"]["metadata"]["labels"]
    selectors = [
        made["Service"]["spec"]["selector"],
        made["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        made["Deployment"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
        assert not selector.items() <= other_labels.items()
    target = made["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        made["Deployment"]["metadata"]["name"],
    )


# -- the pod -------------------------------------------------------------------------------


def test_gpus_set_the_limit_and_the_device_flag() -> None:
    with_gpus = container(builders.deployment(served(), GPU_SPEC, Cluster()))
    assert with_gpus["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert with_gpus["args"][with_gpus["args"].index("--device") + 1] == "cuda"
    cpu_only = container(builders.deployment(served(), ServingSpec(), Cluster()))
    assert not any("gpu" in k for k in cpu_only["resources"].get("limits", {}))
    assert cpu_only["args"][cpu_only["args"].index("--device") + 1] == "cpu"
    amd = ServingSpec(gpus=1, gpu_resource="amd.com/gpu")
    assert container(builders.deployment(served(), amd, Cluster()))["resources"]["limits"] == {
        "memory": "2Gi",
        "amd.com/gpu": "1",
    }


def test_placement_reaches_the_pod_spec() -> None:
    pod = builders.deployment(served(), GPU_SPEC, Cluster())["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert pod["tolerations"] == [
        {"operator": "Exists", "key": "nvidia.com/gpu", "effect": "NoSchedule"}
    ]
    assert pod["affinity"] == GPU_SPEC.affinity
    assert container(builders.deployment(served(), GPU_SPEC, Cluster()))["resources"] == {
        "requests": {"cpu": "2", "memory": "8Gi"},
        "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "2"},
    }


def test_the_server_runs_serve_model_on_the_approved_digest() -> None:
    c = container(builders.deployment(served("fraud", 3), ServingSpec(), Cluster()))
    assert c["command"] == ["stagegate", "serve-model"]
    assert c["args"][0] == "models:/fraud/3"
    assert c["args"][c["args"].index("--expect-digest") + 1] == DIGEST
    assert c["args"][c["args"].index("--port") + 1] == str(c["ports"][0]["containerPort"])
    unchecked = container(builders.deployment(served(digest=None), ServingSpec(), Cluster()))
    assert "--expect-digest" not in unchecked["args"]


def test_the_image_comes_from_the_policy_else_the_cluster_default() -> None:
    cluster = Cluster(image="registry.example.com/stagegate:1.4")
    assert container(builders.deployment(served(), ServingSpec(), cluster))["image"] == (
        "registry.example.com/stagegate:1.4"
    )
    assert container(builders.deployment(served(), GPU_SPEC, cluster))["image"] == GPU_SPEC.image


def test_tracking_uri_comes_from_a_secret() -> None:
    cluster = Cluster(tracking_secret="mlflow-conn", tracking_secret_key="uri")
    env = {
        e["name"]: e
        for e in container(builders.deployment(served(), ServingSpec(), cluster))["env"]
    }
    assert env["MLFLOW_TRACKING_URI"] == {
        "name": "MLFLOW_TRACKING_URI",
        "valueFrom": {"secretKeyRef": {"name": "mlflow-conn", "key": "uri"}},
    }
    assert all("value" not in e or "://" not in e["value"] for e in env.values())


def test_probes_and_a_locked_down_container_with_writable_scratch() -> None:
    deployment = builders.deployment(served(), ServingSpec(startup_timeout_s=300), Cluster())
    pod, c = deployment["spec"]["template"]["spec"], container(deployment)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    # The startup probe gives the model download the policy's time before liveness counts.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == {"/tmp", "/cache"}
    assert all("emptyDir" in volumes[name] for name in mounts.values())
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TMPDIR"] == "/tmp"
    assert env["HOME"] == "/cache"


def test_autoscaling_adds_an_hpa_and_leaves_the_replica_count_to_it() -> None:
    fixed = by_kind(builders.manifests(served(), ServingSpec(replicas=3), Cluster()))
    assert fixed["Deployment"]["spec"]["replicas"] == 3
    assert "HorizontalPodAutoscaler" not in fixed
    scaled = by_kind(builders.manifests(served(), GPU_SPEC, Cluster()))
    assert "replicas" not in scaled["Deployment"]["spec"]
    hpa = scaled["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    pdb = scaled["PodDisruptionBudget"]["spec"]
    assert pdb["maxUnavailable"] == 1


def test_the_service_url_is_the_cluster_dns_name() -> None:
    cluster = Cluster(namespace="models", cluster_domain="corp.local")
    service = builders.service(served("fraud", 3), cluster)
    assert service["spec"]["ports"][0]["port"] == 80
    assert cluster.url("fraud", 3) == "http://fraud-v3.models.svc.corp.local"


# -- the serving spec (policy) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"resources": {"cpu": "two"}},
        {"node_selector": {"bad key!": "x"}},
        {"node_selector": {"pool": "x" * 64}},
        {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        {"tolerations": [{"operator": "Equal", "value": "v"}]},
        {"autoscaling": {"min_replicas": 5, "max_replicas": 2}},
        {"autoscaling": {}, "resources": {"cpu": "0"}},
        {"affinity": {"nodeAffinty": {}}},
        {"gpu_resource": "gpu"},
        {"gpus": -1},
        {"image": "two words"},
        {"replicas": 0},
        {"resources": {"memory": "8Gi"}},  # above the default 2Gi limit
        {"resources": {"cpu": "1500m", "cpu_limit": "1"}},
    ],
)
def test_a_bad_serving_spec_is_refused_when_the_policy_is_written(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ServingSpec.model_validate(bad)


def test_requests_up_to_their_limits_are_accepted() -> None:
    spec = ServingSpec(resources={"cpu": "1500m", "cpu_limit": "2", "memory": "2Gi"})
    assert spec.resources.memory_limit == "2Gi"
    assert quantity_value("1500m") == 1.5
    assert quantity_value("2Gi") == 2 * 1024**3
    assert quantity_value("1e3") == quantity_value("1k") == 1000


def test_policies_carry_a_serving_spec_and_old_ones_still_load() -> None:
    stored = default_policy().model_dump(mode="json")
    stored.pop("serving")  # a policy written before this field existed
    assert Policy.model_validate(stored).serving == ServingSpec()
    with_gpu = Policy.model_validate({**stored, "serving": {"gpus": 1}})
    assert with_gpu.serving.gpus == 1


# -- traffic on a mesh (Gateway API) -----------------------------------------------------------


def test_http_route_weights_and_mirror_follow_the_endpoint() -> None:
    endpoint = EndpointSpec(
        arms={DeploymentRole.champion: 3, DeploymentRole.challenger: 4, DeploymentRole.shadow: 5},
        challenger_weight=0.1,
        shadow_fraction=0.25,
    )
    route = builders.http_route("fraud", endpoint, Cluster(), Gateway("edge", "gateways"))
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"name": "fraud-v3", "port": 80, "weight": 900},
        {"name": "fraud-v4", "port": 80, "weight": 100},
    ]
    mirror = next(f for f in rule["filters"] if f["type"] == "RequestMirror")["requestMirror"]
    assert mirror == {"backendRef": {"name": "fraud-v5", "port": 80}, "percent": 25}
    assert rule["matches"][0]["path"] == {"type": "Exact", "value": "/models/fraud/invocations"}
    assert route["spec"]["parentRefs"][0]["name"] == "edge"
    assert route["spec"]["parentRefs"][0]["namespace"] == "gateways"


def test_http_route_without_challenger_or_shadow_sends_everything_to_the_champion() -> None:
    endpoint = EndpointSpec(arms={DeploymentRole.champion: 3}, shadow_fraction=0.0)
    (rule,) = builders.http_route("f", endpoint, Cluster(), Gateway("g"))["spec"]["rules"]
    assert rule["backendRefs"] == [{"name": "f-v3", "port": 80, "weight": 1000}]
    assert [f["type"] for f in rule["filters"]] == ["URLRewrite"]
    odd = EndpointSpec(
        arms={DeploymentRole.champion: 3, DeploymentRole.shadow: 4}, shadow_fraction=0.125
    )
    (rule,) = builders.http_route("f", odd, Cluster(), Gateway("g"))["spec"]["rules"]
    mirror = rule["filters"][1]["requestMirror"]
    assert mirror["fraction"] == {"numerator": 1250, "denominator": 10_000}
    with pytest.raises(InvalidInput, match="no champion"):
        builders.http_route("f", EndpointSpec(arms={}), Cluster(), Gateway("g"))


# -- `stagegate k8s render` ------------------------------------------------------------------


@pytest.fixture
def render(engine: Engine, factory: Factory) -> Callable[..., Result]:
    """`stagegate k8s render` in process, against the test database, with fraud's v3 the
    champion and v4 the challenger."""
    factory.version("fraud", 3, digest=DIGEST)
    factory.version("fraud", 4)
    factory.version("fraud", 5)
    factory.place("fraud", 3, Stage.production)
    factory.place("fraud", 4, Stage.canary)
    with transaction(engine) as s:
        policy = default_policy().model_copy(update={"serving": GPU_SPEC})
        policies.set_policy(s, "fraud", policy, actor="test")
        endpoints.desire(s, "fraud", actor="test")
    url = engine.url.render_as_string(hide_password=False)
    env = {"STAGEGATE_DB__URL": url, "STAGEGATE_KUBERNETES__NAMESPACE": "models"}

    def invoke(*args: str) -> Result:
        get_settings.cache_clear()
        try:
            return CliRunner().invoke(app, ["k8s", "render", *args], env=env)
        finally:
            get_settings.cache_clear()

    return invoke


def test_render_prints_what_the_builders_make_for_the_endpoint(
    render: Callable[..., Result],
) -> None:
    result = render("fraud", "--traffic", "gateway-api", "--gateway", "edge")
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    cluster = Cluster(namespace="models")
    with_digest = served("fraud", 3, DeploymentRole.champion, DIGEST)
    expected = builders.manifests(with_digest, GPU_SPEC, cluster)
    challenger = served("fraud", 4, DeploymentRole.challenger, f"{4:064x}")
    expected += builders.manifests(challenger, GPU_SPEC, cluster)
    assert docs[:-1] == expected
    route = docs[-1]
    assert route["kind"] == "HTTPRoute"
    weights = [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]]
    assert weights == [900, 100]  # the default policy's challenger weight
    for doc in docs[:-1]:
        kv.validate(doc, "1.30.0", strict=True)


def test_render_one_version_with_a_role(render: Callable[..., Result]) -> None:
    result = render("fraud", "5", "--role", "shadow")
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert {d["metadata"]["labels"]["stagegate.io/role"] for d in docs} == {"shadow"}
    assert {d["metadata"]["name"] for d in docs} == {"fraud-v5"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    args = container(deployment)["args"]
    assert args[args.index("--expect-digest") + 1] == f"{5:064x}"


def test_render_refuses_what_it_cannot_render(render: Callable[..., Result]) -> None:
    assert "pass --role" in render("fraud", "5").output  # v5 plays no role yet
    assert "no version 9" in render("fraud", "9", "--role", "shadow").output
    assert "unknown role" in render("fraud", "3", "--role", "king").output
    refused = render("fraud", "--traffic", "istio")
    assert refused.exit_code != 0
    assert "gateway-api" in refused.output
