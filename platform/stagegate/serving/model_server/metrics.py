"""The model server's Prometheus metrics, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ModelServerMetrics:
    """Requests by status, latency, batch sizes, predict errors, queue depth, load state."""

    def __init__(self, queue_depth: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "stagegate_model_requests",
            "Scoring requests (/invocations) answered, by HTTP status.",
            ["status"],
            registry=r,
        )
        self.latency = Histogram(
            "stagegate_model_request_duration_seconds",
            "Time from a scoring request's arrival to its answer.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_rows = Histogram(
            "stagegate_model_batch_rows",
            "Rows per predict call.",
            buckets=ROW_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "stagegate_model_batch_requests",
            "Requests merged into one predict call.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.predict_errors = Counter(
            "stagegate_model_predict_errors",
            "Scoring requests whose predict call raised (answered 500).",
            registry=r,
        )
        depth = Gauge(
            "stagegate_model_queue_depth",
            "Scoring requests waiting for the predict thread.",
            registry=r,
        )
        depth.set_function(queue_depth)
        self.loaded = Gauge(
            "stagegate_model_loaded", "1 once the model is loaded and served.", registry=r
        )
        self.load_seconds = Gauge(
            "stagegate_model_load_seconds", "How long loading the model took.", registry=r
        )
        self._by_status: dict[int, Counter] = {}

    def answered(self, status: int, seconds: float) -> None:
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self._requests.labels(str(status))
        child.inc()
        self.latency.observe(seconds)

    def batch(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def render(self) -> bytes:
        return generate_latest(self.registry)
