"""Pure manifest builders: a served version and its policy's serving spec in, dicts out.

The backend applies exactly these, and `stagegate k8s render` prints them, so what a GitOps
repository holds and what the backend would apply cannot differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from stagegate.errors import InvalidInput
from stagegate.lifecycle.endpoint import EndpointSpec
from stagegate.lifecycle.serving_spec import ServingSpec, Toleration
from stagegate.lifecycle.stages import DeploymentRole
from stagegate.serving.backends.kubernetes import names
from stagegate.serving.backends.protocol import ServedVersion

Manifest = dict[str, Any]

CONTAINER = "model-server"
CONTAINER_PORT = 8080
SERVICE_PORT = 80
RUN_AS = 10001  # the uid the Dockerfile creates
TMP = "/tmp"  # noqa: S108 - an emptyDir of its own, not the image's /tmp
CACHE = "/cache"
WEIGHT_SCALE = 1000  # Gateway API weights are integers: 0.1 -> 100 of 1000
MIRROR_DENOMINATOR = 10_000


@dataclass(frozen=True)
class Cluster:
    """Where and with what the builders place objects: one namespace per Stagegate."""

    namespace: str = "stagegate"
    image: str = "stagegate:latest"
    tracking_secret: str = "stagegate-mlflow"  # noqa: S105 - a Secret's name, not a secret
    tracking_secret_key: str = "tracking-uri"  # noqa: S105 - the key in that Secret
    cluster_domain: str = "cluster.local"
    service_account: str | None = None
    image_pull_secrets: tuple[str, ...] = ()

    def url(self, model: str, version: int) -> str:
        """The Service's in-cluster URL: what converge publishes to the router."""
        name = names.object_name(model, version)
        return f"http://{name}.{self.namespace}.svc.{self.cluster_domain}"


def _metadata(
    served: ServedVersion, cluster: Cluster, *, role: bool = True, digest: bool = False
) -> dict[str, Any]:
    annotations = {names.MODEL_NAME: served.model}
    if digest and served.digest:
        annotations[names.DIGEST] = served.digest
    return {
        "name": names.object_name(served.model, served.version),
        "namespace": cluster.namespace,
        "labels": names.object_labels(
            served.model, served.version, served.role.value if role else None
        ),
        "annotations": annotations,
    }


def gpus(served: ServedVersion, spec: ServingSpec) -> int:
    """The policy decides; a served version's own request counts where the policy asks none."""
    return spec.gpus or served.gpus


def server_args(served: ServedVersion, spec: ServingSpec) -> list[str]:
    """`stagegate serve-model` arguments; the device follows the GPU limit."""
    args = [
        served.model_uri,
        "--host",
        "0.0.0.0",  # noqa: S104 - inside the pod; the Service is the way in
        "--port",
        str(CONTAINER_PORT),
        "--device",
        "cuda" if gpus(served, spec) else "cpu",
        "--max-batch-rows",
        str(served.max_batch_rows),
        "--max-wait-ms",
        f"{served.max_wait_ms:g}",
    ]
    if served.digest:  # the server hashes the download and refuses any other artifact
        args += ["--expect-digest", served.digest]
    return args


def _resources(served: ServedVersion, spec: ServingSpec) -> dict[str, Any]:
    requests = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    limits: dict[str, str] = {}
    if spec.resources.cpu_limit is not None:
        limits["cpu"] = spec.resources.cpu_limit
    if spec.resources.memory_limit is not None:
        limits["memory"] = spec.resources.memory_limit
    count = gpus(served, spec)
    if count:
        # Extended resources are limits only; the request defaults to the limit.
        limits[spec.gpu_resource] = str(count)
    return {"requests": requests, "limits": limits} if limits else {"requests": requests}


def _probe(*, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _pod_spec(served: ServedVersion, spec: ServingSpec, cluster: Cluster) -> dict[str, Any]:
    container = {
        "name": CONTAINER,
        "image": spec.image or cluster.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["stagegate", "serve-model"],
        "args": server_args(served, spec),
        "ports": [{"name": "http", "containerPort": CONTAINER_PORT, "protocol": "TCP"}],
        "env": [
            {
                "name": "MLFLOW_TRACKING_URI",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": cluster.tracking_secret,
                        "key": cluster.tracking_secret_key,
                    }
                },
            },
            # The root filesystem is read-only: downloads and caches go to the emptyDirs.
            {"name": "TMPDIR", "value": TMP},
            {"name": "HOME", "value": CACHE},
            {"name": "XDG_CACHE_HOME", "value": CACHE},
            {"name": "STAGEGATE_HOME", "value": f"{CACHE}/stagegate"},
        ],
        "resources": _resources(served, spec),
        # /health answers 503 until the model is loaded: the startup probe allows for the
        # download, then liveness restarts a hung server and readiness takes it out of the
        # Service while it cannot answer.
        "startupProbe": _probe(period_s=5, failures=math.ceil(spec.startup_timeout_s / 5)),
        "readinessProbe": _probe(period_s=5, failures=3),
        "livenessProbe": _probe(period_s=10, failures=3),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": TMP},
            {"name": "model-cache", "mountPath": CACHE},
        ],
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "model-cache", "emptyDir": {"sizeLimit": spec.cache_size}},
        ],
    }
    node_selector = {**served.node_selector, **spec.node_selector}
    if node_selector:
        pod["nodeSelector"] = node_selector
    if spec.tolerations:
        pod["tolerations"] = [_toleration(t) for t in spec.tolerations]
    if spec.affinity:
        pod["affinity"] = spec.affinity
    if cluster.service_account:
        pod["serviceAccountName"] = cluster.service_account
    if cluster.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in cluster.image_pull_secrets]
    return pod


def _toleration(t: Toleration) -> dict[str, Any]:
    out: dict[str, Any] = {"operator": t.operator}
    for field, key in (
        ("key", "key"),
        ("value", "value"),
        ("effect", "effect"),
        ("toleration_seconds", "tolerationSeconds"),
    ):
        if getattr(t, field) is not None:
            out[key] = getattr(t, field)
    return out


def deployment(served: ServedVersion, spec: ServingSpec, cluster: Cluster) -> Manifest:
    """The model server's Deployment. With autoscaling it names no replica count, so the
    HPA's count is never overwritten by the next apply."""
    model, version = served.model, served.version
    body: dict[str, Any] = {
        "selector": {"matchLabels": names.selector_labels(model, version)},
        "strategy": {
            "type": "RollingUpdate",
            # A new pod is ready before an old one goes: a version never drops below its count.
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "progressDeadlineSeconds": spec.startup_timeout_s + 60,
        "revisionHistoryLimit": 3,
        "template": {
            "metadata": {
                "labels": names.pod_labels(model, version),
                "annotations": {names.MODEL_NAME: model},
            },
            "spec": _pod_spec(served, spec, cluster),
        },
    }
    if spec.autoscaling is None:
        body = {"replicas": spec.replicas, **body}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(served, cluster, digest=True),
        "spec": body,
    }


def service(served: ServedVersion, cluster: Cluster) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(served, cluster),
        "spec": {
            "type": "ClusterIP",
            "selector": names.selector_labels(served.model, served.version),
            "ports": [
                {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}
            ],
        },
    }


def autoscaler(served: ServedVersion, spec: ServingSpec, cluster: Cluster) -> Manifest | None:
    if spec.autoscaling is None:
        return None
    scaling = spec.autoscaling
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(served, cluster),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": names.object_name(served.model, served.version),
            },
            "minReplicas": scaling.min_replicas,
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {
                            "type": "Utilization",
                            "averageUtilization": scaling.target_cpu_percent,
                        },
                    },
                }
            ],
        },
    }


def disruption_budget(served: ServedVersion, spec: ServingSpec, cluster: Cluster) -> Manifest:
    # maxUnavailable rather than minAvailable: a one-pod version still lets a node drain.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(served, cluster),
        "spec": {
            "maxUnavailable": spec.max_unavailable,
            "selector": {"matchLabels": names.selector_labels(served.model, served.version)},
        },
    }


def manifests(served: ServedVersion, spec: ServingSpec, cluster: Cluster) -> list[Manifest]:
    """Every object of one version, in apply order (the Service first, so its URL resolves
    as soon as pods are ready)."""
    out = [service(served, cluster), deployment(served, spec, cluster)]
    hpa = autoscaler(served, spec, cluster)
    if hpa is not None:
        out.append(hpa)
    out.append(disruption_budget(served, spec, cluster))
    return out


@dataclass(frozen=True)
class Gateway:
    """The Gateway (or mesh Service) an HTTPRoute attaches to."""

    name: str
    namespace: str | None = None
    kind: str = "Gateway"
    group: str = "gateway.networking.k8s.io"


def http_route(model: str, endpoint: EndpointSpec, cluster: Cluster, parent: Gateway) -> Manifest:
    """A Gateway API HTTPRoute with the endpoint's split: champion and challenger as weighted
    backends, the shadow as a RequestMirror. The mesh drops the mirror's answers, so no shadow
    report can be made from it (docs/kubernetes.md)."""
    champion = endpoint.arms.get(DeploymentRole.champion)
    if champion is None:
        raise InvalidInput(f"{model} has no champion: there is nothing to route to")
    challenger = endpoint.arms.get(DeploymentRole.challenger)
    shadow = endpoint.arms.get(DeploymentRole.shadow)

    def ref(version: int) -> dict[str, Any]:
        return {"name": names.object_name(model, version), "port": SERVICE_PORT}

    challenger_share = round(endpoint.challenger_weight * WEIGHT_SCALE) if challenger else 0
    backends = [{**ref(champion), "weight": WEIGHT_SCALE - challenger_share}]
    if challenger is not None:
        backends.append({**ref(challenger), "weight": challenger_share})
    filters: list[dict[str, Any]] = [
        {  # the router's path, rewritten to the model server's
            "type": "URLRewrite",
            "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/invocations"}},
        }
    ]
    if shadow is not None and endpoint.shadow_fraction > 0:
        mirror: dict[str, Any] = {"backendRef": ref(shadow)}
        percent = endpoint.shadow_fraction * 100
        if percent == int(percent):
            mirror["percent"] = int(percent)
        else:
            numerator = round(endpoint.shadow_fraction * MIRROR_DENOMINATOR)
            mirror["fraction"] = {"numerator": numerator, "denominator": MIRROR_DENOMINATOR}
        filters.append({"type": "RequestMirror", "requestMirror": mirror})
    parent_ref: dict[str, Any] = {"group": parent.group, "kind": parent.kind, "name": parent.name}
    if parent.namespace:
        parent_ref["namespace"] = parent.namespace
    labels = {
        names.MANAGED_BY: names.PART_OF,
        names.PART_OF_LABEL: names.PART_OF,
        names.MODEL: names.model_slug(model),
    }
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": names.route_name(model),
            "namespace": cluster.namespace,
            "labels": labels,
            "annotations": {names.MODEL_NAME: model},
        },
        "spec": {
            "parentRefs": [parent_ref],
            "rules": [
                {
                    "matches": [
                        {
                            "path": {
                                "type": "Exact",
                                "value": f"/models/{quote(model, safe='')}/invocations",
                            },
                            "method": "POST",
                        }
                    ],
                    "filters": filters,
                    "backendRefs": backends,
                }
            ],
        },
    }
