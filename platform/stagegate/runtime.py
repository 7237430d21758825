"""The live objects a process needs (engine, registry, event sink, data plane), built once."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

from stagegate.db import Engine, make_engine, transaction
from stagegate.events.sink import EventSink, PrefectEventSink
from stagegate.governance import policies
from stagegate.lifecycle.serving_spec import ServingSpec
from stagegate.registry.protocol import ModelRegistry
from stagegate.serving.backends.local import LocalBackend
from stagegate.serving.backends.protocol import ServingBackend
from stagegate.settings import Settings, get_settings
from stagegate.steps.converge import DataPlane
from stagegate.steps.drift import Monitor
from stagegate.steps.reconcile import ReconcileReport
from stagegate.steps.reconcile import reconcile as reconcile_step

if TYPE_CHECKING:
    from stagegate.serving.backends.kubernetes import Cluster


class Runtime:
    """Built once per process; the registry is made on first use, because importing mlflow
    costs about 2 s and the shadow/canary flow runs never touch it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine = make_engine(settings.database_url, echo=settings.db.echo)
        self.sink: EventSink = PrefectEventSink(settings.prefect.api_url)
        self.plane = DataPlane(
            serving_backend(settings, self.engine),
            router_url=settings.serving.router_url,
            router_token=settings.serving.router_admin_token,
            device=settings.serving.device,
            log_url=settings.inference_log_url,
        )

    @cached_property
    def registry(self) -> ModelRegistry:
        from stagegate.registry.mlflow import MlflowRegistry

        ref = self.settings.reference
        return MlflowRegistry(
            self.settings.mlflow.tracking_uri,
            reference_max_bytes=ref.max_bytes,
            reference_allow_private=ref.allow_private_hosts,
            reference_local_roots=ref.local_roots,
        )


def serving_backend(settings: Settings, engine: Engine) -> ServingBackend:
    """STAGEGATE_SERVING__BACKEND: local processes (the default) or Kubernetes."""
    if settings.serving.backend == "local":
        return LocalBackend(settings.serving_root, tracking_uri=settings.mlflow.tracking_uri)
    from stagegate.serving.backends.kubernetes import KubernetesBackend
    from stagegate.serving.backends.kubernetes.live import connect

    kube = settings.kubernetes
    return KubernetesBackend(
        connect(kube.kubeconfig, kube.context),
        kube_cluster(settings),
        serving_specs(engine),
        poll_s=kube.poll_s,
        rollout_timeout_s=kube.rollout_timeout_s,
    )


def serving_specs(
    engine: Engine, defaults: ServingSpec | None = None
) -> Callable[[str], ServingSpec]:
    """Each model's `Policy.serving`, read at each deploy, so a policy edit takes effect at
    the next converge. A policy that leaves it at its defaults gets the cluster's `defaults`."""

    def spec_for(model: str) -> ServingSpec:
        with transaction(engine, read_only=True) as session:
            spec = policies.get_policy(session, model).serving
        return defaults if defaults is not None and spec == ServingSpec() else spec

    return spec_for


def kube_cluster(settings: Settings) -> Cluster:
    """The builders' view of the Kubernetes settings (also used by `stagegate k8s render`)."""
    from stagegate.serving.backends.kubernetes import Cluster

    kube = settings.kubernetes
    return Cluster(
        namespace=kube.namespace,
        image=kube.image,
        tracking_secret=kube.tracking_secret,
        tracking_secret_key=kube.tracking_secret_key,
        cluster_domain=kube.cluster_domain,
        service_account=kube.service_account,
        image_pull_secrets=tuple(kube.image_pull_secrets),
    )


def monitor(rt: Runtime) -> Monitor:
    """The drift monitor's view of this runtime."""

    def load_reference(model: str, version: int) -> Any:
        return rt.registry.load_reference(model, version)  # mlflow loads on first use

    return Monitor(
        engine=rt.engine,
        sink=rt.sink,
        log_url=rt.settings.inference_log_url,
        load_reference=load_reference,
        alerts=rt.settings.alerts,
        api_url=rt.settings.api.url,
    )


def build(settings: Settings) -> Runtime:
    return Runtime(settings)


@lru_cache(maxsize=1)
def current() -> Runtime:
    """The process-wide runtime (flow runs reuse one engine and connection pool)."""
    return build(get_settings())


def reconcile(rt: Runtime) -> ReconcileReport:
    """One full reconcile pass: catch up, converge every model that needs it, decide reports."""
    return reconcile_step(
        rt.engine,
        rt.registry,
        rt.sink,
        rt.plane,
        stale_after_s=rt.settings.lifecycle.stale_transition_s,
    )
