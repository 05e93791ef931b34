"""Prometheus metrics of the placement service (own registry, served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class PlacementMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.plans = Counter("hydraserve_placement_plans", "plans handed out",
                             ["policy", "pipeline_size", "meets_slo"], registry=r)
        self.plan_errors = Counter("hydraserve_placement_plan_errors", "plan requests refused",
                                   ["reason"], registry=r)
        self.reports = Counter("hydraserve_placement_reports", "worker reports", ["event"], registry=r)
        self.decision_seconds = Histogram(
            "hydraserve_placement_decision_seconds", "time to decide one plan", registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25))
        self.predicted_ttft = Histogram("hydraserve_placement_predicted_ttft_seconds", "predicted TTFT",
                                        registry=r, buckets=(0.5, 1, 2, 4, 6, 8, 10, 15, 20, 30, 60))
        self.nodes = Gauge("hydraserve_placement_nodes", "registered nodes", registry=r)
        self.active_plans = Gauge("hydraserve_placement_active_plans", "plans not yet released", registry=r)
        self.active_fetches = Gauge("hydraserve_placement_active_fetches", "modelled fetches", registry=r)
        self.gpu_free_gb = Gauge("hydraserve_placement_gpu_free_gb", "free device memory", ["node"],
                                 registry=r)
        self.nic_estimate_gbps = Gauge("hydraserve_placement_nic_estimate_gbps", "believed NIC bandwidth",
                                       ["node"], registry=r)
        self.startup_tail_s = Gauge("hydraserve_placement_startup_tail_seconds",
                                    "calibrated time after the last byte", registry=r)
        self.startup_overlap_s = Gauge("hydraserve_placement_startup_overlap_seconds",
                                       "calibrated start-up work overlapping the fetch", registry=r)
