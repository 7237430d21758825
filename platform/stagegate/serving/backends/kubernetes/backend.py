"""The Kubernetes serving backend: the `ServingBackend` calls, on objects the builders make.

Each call observes before it acts. `deploy` reads every object first and writes only those
that differ (server-side apply, field manager `stagegate`, conditional on the resourceVersion
it read, so a write that raced another is redone from a fresh read). It then waits for the
Deployment's rollout by its status. `remove` and `list` touch only objects that carry the
ownership label.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from stagegate.errors import ConflictError, PermanentError, RetryableError
from stagegate.lifecycle.serving_spec import ServingSpec
from stagegate.serving.backends.kubernetes import builders, names
from stagegate.serving.backends.kubernetes.builders import Cluster
from stagegate.serving.backends.kubernetes.client import KubeClient, KubeError, Manifest, Ref
from stagegate.serving.backends.protocol import DeploymentState, ServedVersion

T = TypeVar("T")
Manifests = list[Manifest]  # `list` is a method name in the backend's class body
CONFLICT_ATTEMPTS = 5
# Deleted in this order: nothing scales or protects a Deployment that is already gone.
KINDS = (
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
)


class RolloutNotReady(RetryableError):
    """The version's pods did not become ready in time. Retryable: a node may join, an image
    may appear, a crash may be fixed by the next artifact; reconcile tries again."""

    def __init__(self, detail: str, reasons: list[str]) -> None:
        super().__init__(detail, delay_s=10.0)
        self.reasons = reasons


def contains(live: Any, desired: Any) -> bool:
    """True when every field we set has our value in the stored object; fields the server
    added (defaults, status, managed fields) do not count."""
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(
            k in live and contains(live[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(contains(a, b) for a, b in zip(live, desired, strict=True))
        )
    return bool(live == desired)


def rollout_status(deployment: Manifest) -> tuple[bool, bool, str]:
    """(done, failed, message), read from the status as `kubectl rollout status` does."""
    meta, spec, status = (
        deployment["metadata"],
        deployment.get("spec", {}),
        deployment.get("status") or {},
    )
    if status.get("observedGeneration", 0) < meta.get("generation", 1):
        return False, False, "waiting for the controller to see the new spec"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return False, True, cond.get("message") or "progress deadline exceeded"
    wanted = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < wanted:
        return False, False, f"{updated} of {wanted} pods updated"
    if total > updated:
        return False, False, f"{total - updated} old pods still terminating"
    if available < updated:
        return False, False, f"{available} of {updated} updated pods available"
    return True, False, f"{available} of {wanted} pods available"


def pod_reasons(pods: list[Manifest]) -> list[str]:
    """Why pods are not ready, in the words Kubernetes uses: `Unschedulable: 0/3 nodes are
    available: 3 Insufficient nvidia.com/gpu`, `ImagePullBackOff`, `CrashLoopBackOff`."""
    reasons: list[str] = []

    def add(pod: str, reason: str | None, message: str | None) -> None:
        if reason:
            text = f"pod {pod}: {reason}" + (f": {message}" if message else "")
            if text not in reasons:
                reasons.append(text)

    for pod in pods:
        name, status = pod["metadata"]["name"], pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                add(name, cond.get("reason"), cond.get("message"))
        for container in (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        ):
            if container.get("ready"):
                continue
            waiting = (container.get("state") or {}).get("waiting") or {}
            add(name, waiting.get("reason"), waiting.get("message"))
            last = (container.get("lastState") or {}).get("terminated") or {}
            if last.get("reason"):
                add(name, f"last exit {last['reason']}", f"exit code {last.get('exitCode')}")
    return reasons


class KubernetesBackend:
    """Model servers as one Deployment, Service, PodDisruptionBudget and optional HPA per
    version, in one namespace. `spec_for(model)` is the model's `Policy.serving`."""

    name = "kubernetes"

    def __init__(
        self,
        client: KubeClient,
        cluster: Cluster,
        spec_for: Callable[[str], ServingSpec],
        *,
        poll_s: float = 2.0,
        rollout_timeout_s: float = 300,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.spec_for = spec_for
        self.poll_s = poll_s
        self.rollout_timeout_s = rollout_timeout_s
        self.clock = clock
        self.sleep = sleep

    # -- the protocol -------------------------------------------------------------------------

    def deploy(self, served: ServedVersion, *, timeout_s: float | None = None) -> DeploymentState:
        """Apply what differs, then wait for the rollout (`rollout_timeout_s` by default: a
        model download or a GPU node scaling up takes longer than a local start)."""
        timeout_s = self.rollout_timeout_s if timeout_s is None else timeout_s
        deadline = self.clock() + timeout_s
        spec = self.spec_for(served.model)
        wanted = builders.manifests(served, spec, self.cluster)
        for manifest in wanted:
            self.apply(manifest)
        if not any(m["kind"] == "HorizontalPodAutoscaler" for m in wanted):
            # Autoscaling switched off in the policy: our HPA would keep resizing.
            self._delete_ours(self._ref("autoscaling/v2", "HorizontalPodAutoscaler", served))
        deployment = self._wait(served, deadline, timeout_s)
        return self._state(served.model, served.version, deployment)

    def observe(self, model: str, version: int) -> DeploymentState | None:
        ref = Ref(
            "apps/v1", "Deployment", self.cluster.namespace, names.object_name(model, version)
        )
        live = self._call(lambda: self.client.get(ref))
        if live is None or not names.owned(live):
            return None
        return self._state(model, version, live)

    def remove(self, model: str, version: int) -> bool:
        selector = names.version_selector(model, version)
        namespace = self.cluster.namespace
        removed = False
        for api_version, kind in KINDS:
            found = self._list(api_version, kind, namespace, selector)
            for obj in found:
                if names.owned(obj):  # never trust the selector alone with a delete
                    removed |= self._delete_ours(Ref.of(obj))
        return removed

    def list(self) -> list[DeploymentState]:
        found = self._list("apps/v1", "Deployment", self.cluster.namespace, names.OURS_SELECTOR)
        states = []
        for obj in found:
            meta = obj["metadata"]
            model = (meta.get("annotations") or {}).get(names.MODEL_NAME)
            version = (meta.get("labels") or {}).get(names.VERSION, "")
            if names.owned(obj) and model and version.isdigit():
                states.append(self._state(model, int(version), obj))
        return states

    # -- apply --------------------------------------------------------------------------------

    def apply(self, manifest: Manifest) -> str:
        """Make one object match `manifest`: "created", "patched" or "unchanged". A write that
        raced another writer (409) is redone from a fresh read."""
        ref = Ref.of(manifest)
        for _ in range(CONFLICT_ATTEMPTS):
            live = self._call(lambda: self.client.get(ref))
            if live is not None and not names.owned(live):
                raise PermanentError(
                    f"{ref} exists and is not managed by Stagegate; not adopting it"
                )
            if live is not None and contains(live, manifest):
                return "unchanged"
            body = manifest
            if live is not None:  # conditional on what we read
                version = live["metadata"]["resourceVersion"]
                body = {
                    **manifest,
                    "metadata": {**manifest["metadata"], "resourceVersion": version},
                }
            try:
                self.client.apply(body, field_manager=names.FIELD_MANAGER)
            except KubeError as exc:
                if exc.status == 409:
                    continue
                raise _translate(exc, f"apply {ref}") from exc
            return "created" if live is None else "patched"
        raise RetryableError(
            f"{ref} kept changing while being applied (409 {CONFLICT_ATTEMPTS} times)"
        )

    # -- helpers ------------------------------------------------------------------------------

    def _ref(self, api_version: str, kind: str, served: ServedVersion) -> Ref:
        name = names.object_name(served.model, served.version)
        return Ref(api_version, kind, self.cluster.namespace, name)

    def _delete_ours(self, ref: Ref) -> bool:
        for _ in range(CONFLICT_ATTEMPTS):
            live = self._call(lambda: self.client.get(ref))
            if live is None or not names.owned(live):
                return False
            version = live["metadata"].get("resourceVersion")
            try:
                return self.client.delete(ref, resource_version=version)
            except KubeError as exc:
                if exc.status == 409:  # changed since we looked: look again (it may not be ours)
                    continue
                raise _translate(exc, f"delete {ref}") from exc
        raise RetryableError(f"{ref} kept changing while being deleted")

    def _wait(self, served: ServedVersion, deadline: float, timeout_s: float) -> Manifest:
        ref = self._ref("apps/v1", "Deployment", served)
        selector = _equality(names.selector_labels(served.model, served.version))
        while True:
            live = self._call(lambda: self.client.get(ref))
            if live is None:
                raise RetryableError(f"{ref} disappeared during its rollout")
            done, failed, message = rollout_status(live)
            if done:
                return live
            if failed or self.clock() >= deadline:
                pods = self._list("v1", "Pod", self.cluster.namespace, selector)
                reasons = pod_reasons(pods)
                why = "; ".join(reasons) if reasons else "no pod reports a reason"
                raise RolloutNotReady(
                    f"{served.model} v{served.version}: {ref} not ready after {timeout_s:g} s "
                    f"({message}): {why}",
                    reasons,
                )
            self.sleep(self.poll_s)

    def _state(self, model: str, version: int, deployment: Manifest) -> DeploymentState:
        done, failed, message = rollout_status(deployment)
        status = deployment.get("status") or {}
        return DeploymentState(
            key=f"{model}-v{version}",
            model=model,
            version=version,
            url=self.cluster.url(model, version),
            running=status.get("readyReplicas", 0) > 0,
            healthy=done,
            detail=("failed: " if failed else "") + message,
        )

    def _list(self, api_version: str, kind: str, namespace: str, selector: str) -> Manifests:
        try:
            return self.client.list(api_version, kind, namespace, selector)
        except KubeError as exc:
            raise _translate(exc, f"list {kind}") from exc

    @staticmethod
    def _call(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except KubeError as exc:
            raise _translate(exc, "read") from exc


def _equality(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _translate(exc: KubeError, what: str) -> Exception:
    """Sort API failures into the platform's errors: what may pass is retryable."""
    text = f"Kubernetes refused to {what} ({exc.status}): {exc.message}"
    if exc.status in (0, 408, 429) or exc.status >= 500:
        return RetryableError(text)
    if exc.status == 409:
        return ConflictError(text)
    return PermanentError(text)  # 400, 401, 403, 404 on a namespace, 422 invalid
