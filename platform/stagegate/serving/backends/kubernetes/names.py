"""Object names and labels: DNS-safe, stable per (model, version), and marked as ours.

Model names may hold characters Kubernetes refuses (capitals, `_`, `.`, spaces) or be too
long. Such a name is lowered and cleaned, then given a hash of the real name, so two models
that clean to the same text never share objects. The real name travels in an annotation.
"""

from __future__ import annotations

import hashlib
import re

from stagegate.errors import InvalidInput

PART_OF = "stagegate"
COMPONENT = "model-server"
APP_NAME = "stagegate-model-server"
FIELD_MANAGER = "stagegate"

# The ownership label: `remove` and `list` touch only objects that carry it with our value.
MANAGED_BY = "app.kubernetes.io/managed-by"
NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
PART_OF_LABEL = "app.kubernetes.io/part-of"
MODEL = "stagegate.io/model"
VERSION = "stagegate.io/version"
ROLE = "stagegate.io/role"
MODEL_NAME = "stagegate.io/model-name"  # annotation: the real, unsanitised name
DIGEST = "stagegate.io/digest"  # annotation: the approved artifact digest

_MAX_NAME = 63  # Service names are DNS-1035 labels
_MAX_SLUG = 48  # leaves room for "-v<version>"
_HASH_LEN = 8


def model_slug(model: str) -> str:
    """A DNS-1035 label for the model: the name itself when it already is one, else a
    cleaned prefix plus a hash of the real name."""
    if not model:
        raise InvalidInput("empty model name")
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    if slug and not slug[0].isalpha():
        slug = f"m-{slug}"
    if slug == model and len(slug) <= _MAX_SLUG:
        return slug
    digest = hashlib.sha256(model.encode()).hexdigest()[:_HASH_LEN]
    head = slug[: _MAX_SLUG - _HASH_LEN - 1].rstrip("-")
    return f"{head}-{digest}" if head else f"m-{digest}"


def object_name(model: str, version: int) -> str:
    """The name of every object of one version (Deployment, Service, HPA, PDB)."""
    if version < 0:
        raise InvalidInput(f"bad version {version}")
    name = f"{model_slug(model)}-v{version}"
    if len(name) > _MAX_NAME:  # only with a version of more than 12 digits
        raise InvalidInput(f"version {version} makes the object name too long")
    return name


def selector_labels(model: str, version: int) -> dict[str, str]:
    """What the Service, PDB and HPA select pods by; a Deployment's selector never changes."""
    return {NAME: APP_NAME, INSTANCE: object_name(model, version)}


def version_selector(model: str, version: int | None = None) -> str:
    """A label selector for our objects of one model (and version)."""
    parts = [f"{MANAGED_BY}={PART_OF}", f"{COMPONENT_LABEL}={COMPONENT}"]
    parts.append(f"{MODEL}={model_slug(model)}")
    if version is not None:
        parts.append(f"{VERSION}={version}")
    return ",".join(parts)


OURS_SELECTOR = f"{MANAGED_BY}={PART_OF},{COMPONENT_LABEL}={COMPONENT}"


def pod_labels(model: str, version: int) -> dict[str, str]:
    """Labels of the pods. No role here: a promotion changes the role, and a changed pod
    template would restart every pod of a version that is already serving."""
    return {
        **selector_labels(model, version),
        COMPONENT_LABEL: COMPONENT,
        PART_OF_LABEL: PART_OF,
        MANAGED_BY: PART_OF,
        MODEL: model_slug(model),
        VERSION: str(version),
    }


def object_labels(model: str, version: int, role: str | None) -> dict[str, str]:
    labels = pod_labels(model, version)
    if role is not None:
        labels[ROLE] = role
    return labels


def route_name(model: str) -> str:
    return model_slug(model)


def owned(obj: dict[str, object]) -> bool:
    """True for objects that carry our ownership label (and may be changed or deleted)."""
    metadata = obj.get("metadata")
    labels = metadata.get("labels") if isinstance(metadata, dict) else None
    return isinstance(labels, dict) and labels.get(MANAGED_BY) == PART_OF
