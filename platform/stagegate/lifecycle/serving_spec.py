"""How a model's versions run on Kubernetes: image, resources, GPUs, placement and scaling.

Part of each model's policy (`Policy.serving`), so it is data that people review and version
like the gates. The local backend ignores it; the Kubernetes builders read it.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Kubernetes' own syntax rules, restated so that a bad policy is refused when it is written
# rather than when a rollout is attempted.
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e\d+)?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_IMAGE = re.compile(r"^[^\s]+$")
_AFFINITY_KEYS = frozenset({"nodeAffinity", "podAffinity", "podAntiAffinity"})


def is_label_key(key: str) -> bool:
    """A qualified label key: an optional DNS-subdomain prefix and `/`, then a name of at most
    63 characters."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE.match(value))


_SUFFIX = {
    "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


def quantity_value(value: str) -> float:
    """A quantity as a number (`500m` -> 0.5, `1Gi` -> 1073741824), to compare two."""
    match = _QUANTITY.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = float(match[1]), match[3] or ""
    if suffix.startswith("e"):
        return number * 10.0 ** int(suffix[1:])
    return number * _SUFFIX[suffix]


def _quantity(value: str | None) -> str | None:
    if value is not None and not _QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")
    return value


class Resources(BaseModel):
    """CPU and memory per model-server pod. Requests are what the scheduler reserves."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: str = Field(default="500m", description="CPU request (also what HPA percentages use).")
    memory: str = Field(default="1Gi", description="Memory request.")
    cpu_limit: str | None = Field(default=None, description="CPU limit; None: no limit.")
    memory_limit: str | None = Field(
        default="2Gi", description="Memory limit; the pod is OOM-killed above it."
    )

    @field_validator("cpu", "memory", "cpu_limit", "memory_limit")
    @classmethod
    def _is_quantity(cls, value: str | None) -> str | None:
        return _quantity(value)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Resources:
        # The API server refuses a request above its limit (422); say so when it is written.
        for name, request, limit in (
            ("cpu", self.cpu, self.cpu_limit),
            ("memory", self.memory, self.memory_limit),
        ):
            if limit is not None and quantity_value(request) > quantity_value(limit):
                raise ValueError(f"the {name} request {request} is above its limit {limit}")
        return self


class Toleration(BaseModel):
    """Lets pods run on tainted nodes (GPU node pools are usually tainted)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | None = Field(default=None, description="Taint key; None with Exists: any taint.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="How to match.")
    value: str | None = Field(default=None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; None: every effect."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="NoExecute only: how long the pod stays after the taint."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.key is None and self.operator != "Exists":
            raise ValueError("a toleration without a key needs operator Exists")
        if self.key is not None and not is_label_key(self.key):
            raise ValueError(f"{self.key!r} is not a valid taint key")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds applies only to effect NoExecute")
        return self


class Autoscaling(BaseModel):
    """A HorizontalPodAutoscaler on CPU utilisation (of the CPU request)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(default=1, ge=1, le=1000, description="Fewest pods.")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most pods.")
    target_cpu_percent: int = Field(
        default=70, ge=1, le=1000, description="Average CPU use, in percent of the request."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling.max_replicas is below min_replicas")
        return self


class ServingSpec(BaseModel):
    """Where and how big a model's servers run on Kubernetes (ignored by the local backend)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = Field(
        default=None,
        max_length=512,
        description="Container image with Stagegate and the model's libraries; None: the "
        "cluster default (STAGEGATE_KUBERNETES__IMAGE). Pin by digest in production.",
    )
    replicas: int = Field(
        default=1, ge=1, le=1000, description="Pods per version (ignored with autoscaling)."
    )
    autoscaling: Autoscaling | None = Field(
        default=None, description="Scale on CPU between the bounds instead of fixed replicas."
    )
    resources: Resources = Field(default_factory=Resources)
    gpus: int = Field(
        default=0,
        ge=0,
        le=16,
        description="GPUs per pod (the `nvidia.com/gpu` limit); above 0 the server runs with "
        "`--device cuda`, else `--device cpu`.",
    )
    gpu_resource: str = Field(
        default="nvidia.com/gpu",
        description="Extended resource name of the GPU (the NVIDIA device plugin's default).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must run on (a GPU node pool)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the pods tolerate."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="A Kubernetes `affinity` object (nodeAffinity, podAffinity, "
        "podAntiAffinity), passed through; the API server checks its fields.",
    )
    max_unavailable: int = Field(
        default=1,
        ge=1,
        description="PodDisruptionBudget: at most this many pods of a version evicted at once.",
    )
    startup_timeout_s: int = Field(
        default=600,
        ge=10,
        le=3600,
        description="How long a pod may take to download and load the model before its "
        "liveness probe counts.",
    )
    cache_size: str = Field(
        default="10Gi", description="Size limit of the emptyDir the model is downloaded to."
    )

    @field_validator("image")
    @classmethod
    def _image(cls, image: str | None) -> str | None:
        if image is not None and not _IMAGE.match(image):
            raise ValueError("image must be a single reference without spaces")
        return image

    @field_validator("gpu_resource")
    @classmethod
    def _resource_name(cls, name: str) -> str:
        if "/" not in name or not is_label_key(name):
            raise ValueError(f"{name!r} is not an extended resource name (vendor/name)")
        return name

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, selector: dict[str, str]) -> dict[str, str]:
        bad = [
            f"{k}={v}" for k, v in selector.items() if not is_label_key(k) or not is_label_value(v)
        ]
        if bad:
            raise ValueError(f"invalid node selector labels: {', '.join(sorted(bad))}")
        return selector

    @field_validator("affinity")
    @classmethod
    def _affinity(cls, affinity: dict[str, Any] | None) -> dict[str, Any] | None:
        if affinity is not None and not set(affinity) <= _AFFINITY_KEYS:
            unknown = sorted(set(affinity) - _AFFINITY_KEYS)
            raise ValueError(f"affinity takes only {sorted(_AFFINITY_KEYS)}, not {unknown}")
        return affinity

    @field_validator("cache_size")
    @classmethod
    def _size(cls, value: str) -> str:
        _quantity(value)
        return value

    @model_validator(mode="after")
    def _hpa_needs_cpu_request(self) -> ServingSpec:
        # An HPA on CPU utilisation divides by the request; "0" would never scale.
        if self.autoscaling is not None and quantity_value(self.resources.cpu) == 0:
            raise ValueError("autoscaling needs a non-zero resources.cpu request")
        return self
