"""Prometheus metrics of one runtime worker (own registry, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hydraserve_runtime_requests_total", "Requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("hydraserve_runtime_request_seconds", "Request latency", ["route"],
                                 registry=self.registry)
        self.ttft = Histogram("hydraserve_runtime_ttft_seconds", "From a streamed request's arrival to its first token",
                              registry=self.registry)
        self.tokens = Counter("hydraserve_runtime_generated_tokens_total", "Generated tokens",
                              registry=self.registry)
        self.client_gone = Counter("hydraserve_runtime_client_gone_total",
                                   "Requests stopped before their end because the client went away",
                                   registry=self.registry)
        self.inflight = Gauge("hydraserve_runtime_inflight_requests", "Requests in flight",
                              registry=self.registry)
        self.startup_phase = Gauge("hydraserve_runtime_startup_seconds",
                                   "Seconds from process start to each start-up phase", ["phase"],
                                   registry=self.registry)
