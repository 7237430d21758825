"""The Kubernetes serving backend: pure builders, apply/observe/remove behind `KubeClient`.

The only package that may import `kubernetes`, and only in `live.py`, which is imported on
demand (`connect`), so the builders and `stagegate k8s render` work without a cluster.
"""

from stagegate.serving.backends.kubernetes.backend import KubernetesBackend, RolloutNotReady
from stagegate.serving.backends.kubernetes.builders import Cluster, Gateway
from stagegate.serving.backends.kubernetes.client import KubeClient, KubeError, Ref

__all__ = [
    "Cluster",
    "Gateway",
    "KubeClient",
    "KubeError",
    "KubernetesBackend",
    "Ref",
    "RolloutNotReady",
]
