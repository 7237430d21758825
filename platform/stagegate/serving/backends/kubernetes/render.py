"""`stagegate k8s render`: the builders' manifests as multi-document YAML, for GitOps."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import yaml

from stagegate.lifecycle.endpoint import EndpointSpec
from stagegate.lifecycle.serving_spec import ServingSpec
from stagegate.lifecycle.stages import DeploymentRole
from stagegate.serving.backends.kubernetes import builders
from stagegate.serving.backends.kubernetes.builders import Cluster, Gateway, Manifest
from stagegate.serving.backends.protocol import ServedVersion


def served_version(
    model: str, version: int, role: DeploymentRole, digest: str | None
) -> ServedVersion:
    """The version as converge would deploy it."""
    return ServedVersion(model, version, f"models:/{model}/{version}", role=role, digest=digest)


def endpoint_documents(
    model: str,
    versions: Mapping[int, tuple[DeploymentRole, str | None]],
    spec: ServingSpec,
    cluster: Cluster,
    *,
    route: tuple[EndpointSpec, Gateway] | None = None,
) -> list[Manifest]:
    """Every object of the given versions (version -> role, digest), then the HTTPRoute."""
    docs: list[Manifest] = []
    for version, (role, digest) in sorted(versions.items()):
        docs += builders.manifests(served_version(model, version, role, digest), spec, cluster)
    if route is not None:
        docs.append(builders.http_route(model, route[0], cluster, route[1]))
    return docs


def to_yaml(docs: Iterable[Manifest]) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False, explicit_start=True)
