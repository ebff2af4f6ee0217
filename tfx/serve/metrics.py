"""The server's Prometheus metrics (GET /metrics, the Prometheus text format), one registry
per server so that servers in one process (tests) count apart."""
from __future__ import annotations

import prometheus_client as prom

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Requests and errors by endpoint and status, request latency, batch sizes, queue depth."""

    def __init__(self):
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("tfx_requests", "HTTP requests answered.", ["endpoint", "status"],
                                     registry=self.registry)
        self.errors = prom.Counter("tfx_request_errors", "Requests answered with a 4xx or 5xx status.",
                                   ["endpoint", "status"], registry=self.registry)
        self.latency = prom.Histogram("tfx_request_seconds", "Time from a request's body to its reply.",
                                      ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.sentences = prom.Counter("tfx_sentences", "Sentences translated.", registry=self.registry)
        self.batch_size = prom.Histogram("tfx_batch_sentences", "Sentences per decoded batch.",
                                         buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = prom.Gauge("tfx_queue_sentences", "Sentences waiting to be decoded.",
                                      registry=self.registry)
        self.compilations = prom.Gauge("tfx_compilations", "Programs the backend has compiled since "
                                       "it started (a request that compiles waits for it).",
                                       registry=self.registry)

    def answered(self, endpoint: str, status: int, seconds: float):
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return prom.generate_latest(self.registry)
