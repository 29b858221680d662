"""Prometheus metrics of one service instance, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """Request counts and latency by route and status, queue depth, batch sizes, texts.

    Each instance owns its :class:`~prometheus_client.CollectorRegistry`, so several
    apps (tests, benchmarks) can live in one process.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gradfence_http_requests",
            "HTTP requests by route, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "gradfence_http_request_duration_seconds",
            "HTTP request latency by route, method and status.",
            ("route", "method", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "gradfence_batch_size",
            "Texts per model batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_duration = Histogram(
            "gradfence_batch_duration_seconds",
            "Model time per batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.texts = Counter(
            "gradfence_texts", "Texts run through the model.", registry=self.registry
        )
        self.queue_depth = Gauge(
            "gradfence_queue_depth", "Texts waiting for a batch.", registry=self.registry
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one finished HTTP request."""
        labels = (route, method, str(status))
        self.requests.labels(*labels).inc()
        self.latency.labels(*labels).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        """Count one model batch (called from the inference thread)."""
        self.batch_size.observe(size)
        self.batch_duration.observe(seconds)
        self.texts.inc(size)

    def track(self, queue_depth: Callable[[], float]) -> None:
        """Read the queue depth from this callable at scrape time.

        Throughput is not a gauge here: ``rate(gradfence_texts_total[1m])`` computes it
        from the counter (Prometheus convention: export counters, not rates).
        """
        self.queue_depth.set_function(queue_depth)
