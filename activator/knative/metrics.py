"""The interceptor's Prometheus metrics, registered beside the placement service's (one
process, one GET /metrics: `hydraserve interceptor` serves both)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class InterceptorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.cold_starts = Counter(
            "hydraserve_interceptor_cold_starts", "function pods' cold starts by how they ended: serving, "
            "failed_before_binding (retried), failed_after_binding (pod deleted), conflict (bound meanwhile), "
            "deleted (the pod went first), invalid (its annotations do not say enough)", ["result"], registry=r)
        self.cold_start_seconds = Histogram(
            "hydraserve_interceptor_cold_start_seconds", "pod seen pending -> its group serves", registry=r,
            buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 30, 60, 120, 300, 600))
        self.adopted = Counter("hydraserve_interceptor_groups_adopted", "groups taken over from an earlier leader",
                               registry=r)
        self.groups_failed = Counter("hydraserve_interceptor_groups_failed",
                                     "serving groups failed (a helper or a node lost)", registry=r)
        self.groups = Gauge("hydraserve_interceptor_groups", "function pods whose group serves", registry=r)
        self.leading = Gauge("hydraserve_interceptor_leading", "1 while this replica holds the Lease", registry=r)
