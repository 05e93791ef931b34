"""The gateway's Prometheus metrics, in one registry per gateway (tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNKNOWN_FUNCTION = "_unknown"
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)  # the label of requests that named no registered function


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hydraserve_gateway_requests_total",
                                "Requests answered, by function and HTTP status (404 and 503 included)",
                                ["function", "status"], registry=self.registry)
        self.cold_starts = Counter("hydraserve_gateway_cold_starts_total", "Cold starts begun",
                                   ["function"], registry=self.registry)
        self.replicas = Counter("hydraserve_gateway_replicas_total",
                                "Instances added when a consolidated pipeline group's other full workers "
                                "began serving on their own", ["function"], registry=self.registry)
        self.prewarms = Counter("hydraserve_gateway_prewarms_total",
                                "Pre-warms asked for (weights fetched into a node's loaderd before a likely "
                                "arrival, from the function's idle-time histogram)", ["function"],
                                registry=self.registry)
        self.instance_failures = Counter("hydraserve_gateway_instance_failures_total",
                                         "Instances failed while serving (lost worker, broken group)",
                                         ["function"], registry=self.registry)
        self.retries = Counter("hydraserve_gateway_request_retries_total",
                               "Requests sent again to a fresh instance after theirs failed",
                               ["function"], registry=self.registry)
        self.client_disconnects = Counter("hydraserve_gateway_client_disconnects_total",
                                          "Requests whose client went away before the answer ended",
                                          ["function"], registry=self.registry)
        self.waiting = Gauge("hydraserve_gateway_waiting_requests", "Requests parked for a free instance",
                             ["function"], registry=self.registry)
        self.instances = Gauge("hydraserve_gateway_instances", "Ready instances", ["function"],
                               registry=self.registry)
        self.failed_functions = Gauge("hydraserve_gateway_function_failed",
                                      "1 while the function is failed (its cold start failed for a reason no "
                                      "retry fixes; it waits for a change to it or its model)", ["function"],
                                      registry=self.registry)
        self.tokens = Counter("hydraserve_gateway_tokens_total",
                              "Tokens the function read (kind=prompt) and wrote (kind=completion), from its "
                              "answers' usage", ["function", "kind"], registry=self.registry)
        self.instance_seconds = Counter("hydraserve_gateway_instance_seconds_total",
                                        "Seconds of instances up (each instance counts its own)", ["function"],
                                        registry=self.registry)
        self.memory_gb_seconds = Counter("hydraserve_gateway_memory_gb_seconds_total",
                                         "Device memory its instances' workers held (GB), times seconds",
                                         ["function"], registry=self.registry)
        self.queue_wait_seconds = Histogram("hydraserve_gateway_queue_wait_seconds",
                                            "Seconds a request waited for a free instance (a cold start, a busy one)",
                                            ["function"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.cold_start_seconds = Histogram("hydraserve_gateway_cold_start_seconds",
                                            "Seconds from a cold start's first request to its instance ready",
                                            ["function"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.time_to_first_token_seconds = Histogram(
            "hydraserve_gateway_time_to_first_token_seconds",
            "Seconds from a request's arrival to the first byte of its instance's body (a stream's first token)",
            ["function"], buckets=SECONDS_BUCKETS, registry=self.registry)
