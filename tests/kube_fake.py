"""An in-memory Kubernetes API behind Stagegate's own `KubeClient` protocol.

It behaves like an API server where the backend's logic depends on it: resourceVersion and
generation, 409 on a stale conditional write, 404 on missing objects, 422 on objects the
strict schema (or Kubernetes' name rules, or an immutable selector) refuses, server-side
defaults, field managers and equality label selectors. A Deployment's controller is a script:
tests choose whether its pods become ready, when, or why they do not.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import kubernetes_validate.utils as kv
import yaml
from referencing import Registry, Resource

from stagegate.serving.backends.kubernetes.client import KubeError, Manifest, Ref

SCHEMA_VERSION = "1.30.0"
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

Key = tuple[str, str, str, str]  # apiVersion, kind, namespace, name


@dataclass
class Rollout:
    """How the fake Deployment controller treats one Deployment.

    `ready_after_reads`: the status reports ready only after this many reads of the
    Deployment (0: at once). `pod_status`: the status every pod reports while not ready (the
    reasons the backend must surface). `deadline_exceeded`: the Progressing condition says
    ProgressDeadlineExceeded while not ready.
    """

    ready_after_reads: int | None = 0  # None: never
    pod_status: dict[str, Any] = field(default_factory=dict)
    deadline_exceeded: bool = False
    reads: int = 0


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, Manifest] = {}
        self._versions = itertools.count(1)
        self.rollouts: dict[str, Rollout] = {}
        self.calls: list[tuple[str, str, str]] = []  # (verb, kind, name) of every call
        self.conflicts_answered = 0
        self._before_write: dict[Key, list[Callable[[], None]]] = {}

    # -- scripting ------------------------------------------------------------------------

    def script(self, deployment: str, rollout: Rollout) -> None:
        self.rollouts[deployment] = rollout

    def race(self, ref: Ref, times: int = 1) -> None:
        """Another writer changes the object between our read and our next `times` writes."""

        def meddle() -> None:
            obj = self.objects[_key_of_ref(ref)]
            obj["metadata"].setdefault("annotations", {})["other-writer/touched"] = "yes"
            obj["metadata"]["resourceVersion"] = str(next(self._versions))

        for _ in range(times):
            self.before_next_write(ref, meddle)

    def before_next_write(self, ref: Ref, action: Callable[[], None]) -> None:
        """Run `action` just before the next write to `ref` (after the client's read)."""
        self._before_write.setdefault(_key_of_ref(ref), []).append(action)

    def put(self, manifest: Manifest) -> Manifest:
        """Store an object as someone else (kubectl, another tool) would: no checks."""
        obj = copy.deepcopy(manifest)
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1)
        self.objects[_key(obj)] = obj
        return copy.deepcopy(obj)

    def writes(self) -> list[tuple[str, str, str]]:
        return [c for c in self.calls if c[0] in ("apply", "delete")]

    # -- the protocol ---------------------------------------------------------------------

    def get(self, ref: Ref) -> Manifest | None:
        self.calls.append(("get", ref.kind, ref.name))
        obj = self.objects.get(_key_of_ref(ref))
        if obj is None:
            return None
        if ref.kind == "Deployment":
            self._progress(obj)
        return copy.deepcopy(obj)

    def apply(self, manifest: Manifest, *, field_manager: str) -> Manifest:
        self.calls.append(("apply", manifest["kind"], manifest["metadata"]["name"]))
        body = copy.deepcopy(manifest)
        key = _key(body)
        for meddle in self._pop_meddlers(key):
            meddle()
        wanted_version = body["metadata"].pop("resourceVersion", None)
        live = self.objects.get(key)
        if wanted_version is not None:
            if live is None:
                raise KubeError(404, f"{key[1]} {key[3]} not found")
            if live["metadata"]["resourceVersion"] != wanted_version:
                self.conflicts_answered += 1
                raise KubeError(409, "the object has been modified; apply to the latest version")
        _check(body)
        if live is not None and body["kind"] == "Deployment":
            _deployment_update(live, body)
        _default(body)
        if live is not None and _same(live, body):
            return copy.deepcopy(live)  # a no-op apply changes nothing, not even the version
        meta = body["metadata"]
        if live is None:
            meta.update(uid=str(uuid.uuid4()), creationTimestamp="2026-01-01T00:00:00Z")
            meta["generation"] = 1
        else:
            for kept in ("uid", "creationTimestamp"):
                meta[kept] = live["metadata"][kept]
            changed = live.get("spec") != body.get("spec")
            meta["generation"] = live["metadata"]["generation"] + int(changed)
            if "status" in live:
                body["status"] = live["status"]
        meta["resourceVersion"] = str(next(self._versions))
        meta["managedFields"] = [{"manager": field_manager, "operation": "Apply"}]
        self.objects[key] = body
        if body["kind"] == "Deployment":
            self.rollouts.setdefault(meta["name"], Rollout())
            self.rollouts[meta["name"]].reads = 0
            self._reconcile_pods(body)
            self._progress(body)
        return copy.deepcopy(body)

    def delete(self, ref: Ref, *, resource_version: str | None = None) -> bool:
        self.calls.append(("delete", ref.kind, ref.name))
        key = _key_of_ref(ref)
        for meddle in self._pop_meddlers(key):
            meddle()
        live = self.objects.get(key)
        if live is None:
            return False
        if resource_version is not None and live["metadata"]["resourceVersion"] != resource_version:
            self.conflicts_answered += 1
            raise KubeError(409, "precondition failed: resourceVersion")
        del self.objects[key]
        if ref.kind == "Deployment":  # background deletion of its pods
            selector = live["spec"]["selector"]["matchLabels"]
            for pod_key in [k for k, o in self.objects.items() if _is_pod_of(o, ref, selector)]:
                del self.objects[pod_key]
        return True

    def list(
        self, api_version: str, kind: str, namespace: str, label_selector: str
    ) -> list[Manifest]:
        self.calls.append(("list", kind, label_selector))
        wanted = _parse_selector(label_selector)
        return [
            copy.deepcopy(o)
            for (a, k, ns, _), o in sorted(self.objects.items())
            if a == api_version
            and k == kind
            and ns == namespace
            and all((o["metadata"].get("labels") or {}).get(n) == v for n, v in wanted.items())
        ]

    # -- the scripted controller ----------------------------------------------------------

    def _pop_meddlers(self, key: Key) -> list[Callable[[], None]]:
        queue = self._before_write.get(key) or []
        return [queue.pop(0)] if queue else []

    def _reconcile_pods(self, deployment: Manifest) -> None:
        """Pods from the template (a ReplicaSet's work): old pods go, new pods come."""
        meta = deployment["metadata"]
        ns, name = meta["namespace"], meta["name"]
        for key in [k for k in self.objects if k[1] == "Pod" and k[3].startswith(name + "-")]:
            del self.objects[key]
        template = deployment["spec"]["template"]
        for i in range(deployment["spec"].get("replicas", 1)):
            pod_name = f"{name}-{meta['generation']}-{i}"
            self.objects[("v1", "Pod", ns, pod_name)] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "namespace": ns,
                    "labels": dict(template["metadata"]["labels"]),
                    "resourceVersion": str(next(self._versions)),
                },
                "spec": copy.deepcopy(template["spec"]),
                "status": {},
            }

    def _progress(self, deployment: Manifest) -> None:
        meta, spec = deployment["metadata"], deployment["spec"]
        rollout = self.rollouts.setdefault(meta["name"], Rollout())
        rollout.reads += 1
        wanted = spec.get("replicas", 1)
        ready = rollout.ready_after_reads is not None and rollout.reads > rollout.ready_after_reads
        pods = [
            o
            for k, o in self.objects.items()
            if k[1] == "Pod" and k[3].startswith(meta["name"] + "-")
        ]
        for pod in pods:
            pod["status"] = (
                {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
                if ready
                else copy.deepcopy(rollout.pod_status) or {"phase": "Pending"}
            )
        progressing = {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}
        if ready:
            progressing["reason"] = "NewReplicaSetAvailable"
        elif rollout.deadline_exceeded:
            progressing = {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": f'ReplicaSet "{meta["name"]}" has timed out progressing.',
            }
        deployment["status"] = {
            "observedGeneration": meta["generation"],
            "replicas": wanted,
            "updatedReplicas": wanted,
            "readyReplicas": wanted if ready else 0,
            "availableReplicas": wanted if ready else 0,
            "conditions": [
                {
                    "type": "Available",
                    "status": "True" if ready else "False",
                    "reason": "MinimumReplicasAvailable" if ready else "MinimumReplicasUnavailable",
                },
                progressing,
            ],
        }


def _key(obj: Manifest) -> Key:
    meta = obj["metadata"]
    return (obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])


def _key_of_ref(ref: Ref) -> Key:
    return (ref.api_version, ref.kind, ref.namespace, ref.name)


def _is_pod_of(obj: Manifest, ref: Ref, selector: dict[str, str]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return (
        obj["kind"] == "Pod"
        and obj["metadata"]["namespace"] == ref.namespace
        and all(labels.get(k) == v for k, v in selector.items())
    )


def _parse_selector(selector: str) -> dict[str, str]:
    out = {}
    for part in filter(None, selector.split(",")):
        name, sep, value = part.partition("=")
        if not sep or name.endswith("!"):
            raise KubeError(400, f"unsupported label selector {part!r}")
        out[name] = value
    return out


@functools.cache
def _validator(api_version: str, kind: str) -> Any:
    """kubernetes-validate's strict schema for the kind, loaded once: its `validate` re-reads
    1.2 MB of definitions per call, which every apply here would pay."""
    schema_dir = f"kubernetes-json-schema/v{SCHEMA_VERSION}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = f"{schema_dir}/{kind.lower()}-{group_version}.json"
    schema = kv.schema_contents(path, SCHEMA_VERSION)
    definitions = kv.schema_contents(f"{schema_dir}/_definitions.json", SCHEMA_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _check(obj: Manifest) -> None:
    """What the API server refuses with 422: schema (strict: no unknown fields), names and
    label values."""
    try:
        validator = _validator(obj["apiVersion"], obj["kind"])
    except FileNotFoundError as exc:
        raise KubeError(404, f"the server does not serve {obj['kind']}") from exc
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is not None:
        raise KubeError(422, f"{obj['kind']} is invalid: {error.message}")
    meta = obj["metadata"]
    if len(meta["name"]) > 63 or not _DNS_1123_LABEL.match(meta["name"]):
        raise KubeError(422, f"metadata.name: Invalid value: {meta['name']!r}")
    for name, value in (meta.get("labels") or {}).items():
        if not _LABEL_VALUE.match(value) or len(value) > 63:
            raise KubeError(422, f"metadata.labels: Invalid value: {name}={value!r}")


def _deployment_update(live: Manifest, body: Manifest) -> None:
    if live["spec"]["selector"] != body["spec"]["selector"]:
        raise KubeError(422, "spec.selector: Invalid value: field is immutable")
    if "replicas" not in body["spec"]:
        # Another manager (the HPA) owns the count; an apply that omits it keeps it.
        body["spec"]["replicas"] = live["spec"]["replicas"]


def _default(obj: Manifest) -> None:
    """A few of the server's defaults, so that "unchanged" means "our fields unchanged"."""
    spec = obj.get("spec") or {}
    if obj["kind"] == "Deployment":
        spec.setdefault("replicas", 1)
        pod = spec["template"]["spec"]
        pod.setdefault("restartPolicy", "Always")
        pod.setdefault("dnsPolicy", "ClusterFirst")
        pod.setdefault("schedulerName", "default-scheduler")
        pod.setdefault("terminationGracePeriodSeconds", 30)
        for container in pod["containers"]:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
    elif obj["kind"] == "Service":
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("clusterIP", "10.96.0.10")
        spec.setdefault("ipFamilies", ["IPv4"])


def _same(live: Manifest, body: Manifest) -> bool:
    def strip(meta: dict[str, Any]) -> dict[str, Any]:
        gone = {"uid", "creationTimestamp", "generation", "resourceVersion", "managedFields"}
        return {k: v for k, v in meta.items() if k not in gone}

    return live.get("spec") == body.get("spec") and strip(live["metadata"]) == strip(
        body["metadata"]
    )


# -- the same fake on the wire: what `live.py` sends, answered as an API server would -----------

_KINDS: dict[tuple[str, str], list[tuple[str, str]]] = {  # (group, version) -> (plural, kind)
    ("", "v1"): [("services", "Service"), ("pods", "Pod")],
    ("apps", "v1"): [("deployments", "Deployment")],
    ("autoscaling", "v2"): [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    ("policy", "v1"): [("poddisruptionbudgets", "PodDisruptionBudget")],
}
_OBJECT_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)


@dataclass(frozen=True)
class WireCall:
    method: str
    path: str
    query: dict[str, str]
    content_type: str | None
    body: Any


def _resource_list(group: str, version: str) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": [
            {
                "name": plural,
                "singularName": kind.lower(),
                "namespaced": True,
                "kind": kind,
                "verbs": ["create", "delete", "get", "list", "patch", "update"],
            }
            for plural, kind in _KINDS[(group, version)]
        ],
    }


def _groups() -> dict[str, Any]:
    groups = []
    for group, version in _KINDS:
        if group:
            gv = {"groupVersion": f"{group}/{version}", "version": version}
            groups.append({"name": group, "versions": [gv], "preferredVersion": gv})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


class WireServer:
    """`FakeKube` behind HTTP, on a free loopback port, in a thread (no process)."""

    def __init__(self, fake: FakeKube) -> None:
        self.fake = fake
        self.calls: list[WireCall] = []
        handler = _handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WireServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def answer(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        """The JSON answer; KubeError for a failure status."""
        if method == "GET":
            found = _discovery(path)
            if found is not None:
                return found
        return self._object(method, path, query, body)

    def _object(self, method: str, path: str, query: dict[str, str], body: Any) -> Any:
        match = _OBJECT_PATH.match(path)
        if match is None:
            raise KubeError(404, f"no route {method} {path}")
        group, version = (match["group"] or "", match["version"] or match["core"])
        kind = dict(_KINDS[(group, version)])[match["plural"]]
        api_version = f"{group}/{version}" if group else version
        if match["name"] is None and method == "GET":
            items = self.fake.list(api_version, kind, match["ns"], query.get("labelSelector", ""))
            return {"kind": f"{kind}List", "apiVersion": api_version, "items": items}
        ref = Ref(api_version, kind, match["ns"], match["name"])
        if method == "GET":
            found = self.fake.get(ref)
            if found is None:
                raise KubeError(404, f'{match["plural"]} "{ref.name}" not found')
            return found
        if method == "PATCH":
            return self.fake.apply(body, field_manager=query["fieldManager"])
        if method == "DELETE":
            wanted = ((body or {}).get("preconditions") or {}).get("resourceVersion")
            if not self.fake.delete(ref, resource_version=wanted):
                raise KubeError(404, f'{match["plural"]} "{ref.name}" not found')
            return {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        raise KubeError(405, f"{method} not allowed")


def _discovery(path: str) -> dict[str, Any] | None:
    """What the dynamic client asks before its first call per kind."""
    parts = path.strip("/").split("/")
    if path == "/version":
        return {"major": "1", "minor": "30", "gitVersion": "v1.30.0"}
    if path == "/apis":
        return _groups()
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"]}
    if parts[0] == "api" and len(parts) == 2:
        return _resource_list("", parts[1])
    if parts[0] == "apis" and len(parts) == 3:
        return _resource_list(parts[1], parts[2])
    return None


def _handler(wire: WireServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            query = dict(parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = yaml.safe_load(raw) if raw else None  # apply patches are YAML (JSON is YAML)
            content_type = self.headers.get("Content-Type")
            wire.calls.append(WireCall(self.command, url.path, query, content_type, body))
            try:
                status, answer = 200, wire.answer(self.command, url.path, query, body)
            except KubeError as exc:
                status = exc.status
                answer = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "message": exc.message,
                    "code": exc.status,
                }
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PATCH = do_DELETE = _serve

        def log_message(self, *_: Any) -> None:
            pass

    return Handler
