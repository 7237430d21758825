"""The router's Prometheus metrics, on a registry of its own (one per router instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

# Upstream answers are sub-millisecond to seconds: fine buckets at the low end.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class RouterMetrics:
    """Counters and histograms the router updates; `render()` is the /metrics body."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "stagegate_router_requests",
            "What each arm answered (599: no answer); a fallen-back challenger counts with its "
            "failure, then the champion with its answer; shadows included.",
            ["model", "version", "role", "status"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "stagegate_router_upstream_latency_seconds",
            "Time for an arm to answer (or fail), shadows included.",
            ["model", "version", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "stagegate_router_fallbacks",
            "Challenger failures, by reason; answered by the champion when the policy says so.",
            ["model", "reason"],
            registry=r,
        )
        self.shadow = Counter(
            "stagegate_router_shadow",
            "Shadow mirrors: mirrored (answered < 500), failed (5xx, error, timeout), dropped.",
            ["model", "outcome"],
            registry=r,
        )
        self.reloads = Counter(
            "stagegate_router_policy_reloads",
            "Policy loads: ok (swapped in) or rejected (old policy kept).",
            ["result"],
            registry=r,
        )
        self.stale_retries = Counter(
            "stagegate_router_stale_connection_retries",
            "Requests retried once on a fresh connection after a stale keep-alive one.",
            registry=r,
        )
        self.unknown_models = Counter(
            "stagegate_router_unknown_model", "Requests for a model with no policy.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
