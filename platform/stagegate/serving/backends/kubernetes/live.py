"""`KubeClient` on the official client's dynamic API: the only module that imports kubernetes.

Kept to a translation of five calls, because no API server can run where Stagegate's tests
run: it is type-checked but untested against a live cluster (docs/kubernetes.md says how to
try it on kind). Everything it is asked to do is decided, and tested, in `backend.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import config as _kube_config
from kubernetes.client import ApiClient
from kubernetes.dynamic import DynamicClient as _DynamicClient
from kubernetes.dynamic.exceptions import DynamicApiError, NotFoundError, ResourceNotFoundError
from urllib3.exceptions import HTTPError

from stagegate.errors import PermanentError
from stagegate.serving.backends.kubernetes.client import KubeError, Manifest, Ref

T = TypeVar("T")
# The dynamic client and the config loaders carry no annotations: reached through Any.
kube_config: Any = _kube_config
DynamicClient: Any = _DynamicClient


class LiveClient:
    """Server-side apply with `force`, optimistic deletes, equality label selectors."""

    def __init__(self, api: ApiClient, *, discovery_cache: Path | None = None) -> None:
        self._api = api
        self._cache = discovery_cache  # None: the client's file in the temp folder
        self._client: Any = None

    def _dynamic(self) -> Any:
        # Made on first use: making it asks the server for its version, and a process that
        # builds its runtime while the cluster is away should fail at the call, retryably.
        if self._client is None:
            cache = str(self._cache) if self._cache else None
            self._client = _call(lambda: DynamicClient(self._api, cache_file=cache))
        return self._client

    def _resource(self, api_version: str, kind: str) -> Any:
        try:  # discovery: the first call per kind asks the server which kinds it serves
            return _call(lambda: self._dynamic().resources.get(api_version=api_version, kind=kind))
        except ResourceNotFoundError as exc:
            raise KubeError(400, f"the API server does not serve {api_version} {kind}") from exc

    def get(self, ref: Ref) -> Manifest | None:
        resource = self._resource(ref.api_version, ref.kind)
        try:
            found = _call(lambda: resource.get(name=ref.name, namespace=ref.namespace))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise
        return _plain(found)

    def apply(self, manifest: Manifest, *, field_manager: str) -> Manifest:
        resource = self._resource(manifest["apiVersion"], manifest["kind"])
        meta = manifest["metadata"]
        stored = _call(
            lambda: resource.server_side_apply(
                body=manifest,
                name=meta["name"],
                namespace=meta["namespace"],
                field_manager=field_manager,
                force_conflicts=True,
            )
        )
        return _plain(stored)

    def delete(self, ref: Ref, *, resource_version: str | None = None) -> bool:
        resource = self._resource(ref.api_version, ref.kind)
        options: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
        }
        if resource_version is not None:
            options["preconditions"] = {"resourceVersion": resource_version}
        try:
            _call(lambda: resource.delete(name=ref.name, namespace=ref.namespace, body=options))
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str
    ) -> list[Manifest]:
        resource = self._resource(api_version, kind)
        found = _call(lambda: resource.get(namespace=namespace, label_selector=label_selector))
        items = _plain(found).get("items") or []
        return [dict(item) for item in items]


def connect(kubeconfig: Path | None = None, context: str | None = None) -> LiveClient:
    """In a pod: the service account's in-cluster config. Elsewhere: the kubeconfig. No
    configuration at all is a PermanentError; no server is noticed at the first call."""
    try:
        if kubeconfig is None and context is None:
            try:
                kube_config.load_incluster_config()
            except kube_config.ConfigException:
                kube_config.load_kube_config()
        else:
            kube_config.load_kube_config(
                config_file=str(kubeconfig) if kubeconfig else None, context=context
            )
    except kube_config.ConfigException as exc:
        raise PermanentError(f"no Kubernetes configuration: {exc}") from exc
    return LiveClient(ApiClient())


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except NotFoundError as exc:
        raise KubeError(404, _summary(exc)) from exc
    except DynamicApiError as exc:
        raise KubeError(int(exc.status or 0), _summary(exc)) from exc
    except (HTTPError, OSError) as exc:
        raise KubeError(0, f"no answer from the API server: {exc}") from exc


def _plain(found: Any) -> Manifest:
    return dict(found.to_dict()) if hasattr(found, "to_dict") else dict(found)


def _summary(exc: Any) -> str:
    return str(exc.summary())
