"""PlacementService: the cluster model, the planner and calibration behind one lock.

Called by the HTTP API (hydraserve.provider.api), by `hydraserve plan` in-process, and by tests.
``now`` defaults to the injected clock (time.time live); every decision goes through
hydraserve.provider.planner and hydraserve.provider.lifecycle, the same code the simulator runs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from hydraserve.contracts.plan import (
    ClusterStatus,
    NodeInfo,
    NodeStatus,
    Plan,
    PlanRequest,
    ReportAck,
    WorkerReport,
)
from hydraserve.errors import HydraError, NotFoundError
from hydraserve.provider.calibration import Calibration
from hydraserve.provider.cluster import ClusterState
from hydraserve.provider.lifecycle import apply_report, commit
from hydraserve.provider.metrics import PlacementMetrics
from hydraserve.provider.planner import Planner
from hydraserve.provider.policies import DEFAULT_POLICY, Policy, get_policy


class PlacementService:
    """Thread-safe facade: register nodes, plan (and reserve), take reports, describe the cluster."""

    def __init__(self, policy: Policy | str = DEFAULT_POLICY, *, clock: Callable[[], float] = time.time,
                 metrics: PlacementMetrics | None = None, per_node_metrics: bool = True) -> None:
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.clock = clock
        self.cluster = ClusterState(Calibration(enabled=self.policy.calibrated))
        self.planner = Planner(self.cluster, self.policy)
        self.metrics = metrics or PlacementMetrics()
        self._lock = threading.Lock()
        self.per_node_metrics = per_node_metrics  # the simulator turns these off (cost, not value)

    def register_node(self, info: NodeInfo, now: float | None = None) -> NodeStatus:
        with self._lock:
            self.cluster.upsert_node(info, self.clock() if now is None else now)
            self.metrics.nodes.set(self.cluster.size)
            self._node_metrics(info.name)
            return self._node_status(info.name)

    def remove_node(self, name: str) -> None:
        """Forget node ``name`` (NotFoundError when unknown; ConflictError while a plan uses it)."""
        with self._lock:
            if name not in self.cluster.nodes:
                raise NotFoundError(f"no node {name!r}", param="name")
            self.cluster.remove_node(name)
            self.metrics.nodes.set(self.cluster.size)
            if self.per_node_metrics:
                for gauge in (self.metrics.gpu_free_gb, self.metrics.nic_estimate_gbps):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)

    def plan(self, request: PlanRequest, now: float | None = None) -> Plan:
        with self._lock:
            t = self.clock() if now is None else now
            started = time.perf_counter()
            try:
                plan = self.planner.plan(request, t)
            except HydraError as exc:
                self.metrics.plan_errors.labels(exc.code or exc.error_type).inc()
                raise
            finally:
                self.metrics.decision_seconds.observe(time.perf_counter() - started)
            if not request.dry_run:
                fn = request.function
                commit(self.cluster, self.policy, plan, fn.ttft_slo_s, fn.prefill_s or 0.0, t)
                self.metrics.plans.labels(self.policy.name, str(plan.pipeline_size), str(plan.meets_slo)).inc()
                self.metrics.predicted_ttft.observe(plan.predicted_ttft_s)
                for st in plan.stages:
                    self._node_metrics(st.node)
            self._gauges()
            return plan

    def report(self, report: WorkerReport, now: float | None = None) -> ReportAck:
        with self._lock:
            active = self.cluster.plans.get(report.plan_id)
            ack = apply_report(self.cluster, self.policy, report, self.clock() if now is None else now)
            self.metrics.reports.labels(report.event).inc()
            if active is not None:
                for st in active.plan.stages:
                    self._node_metrics(st.node)
            self._gauges()
            return ack

    def status(self, now: float | None = None) -> ClusterStatus:
        with self._lock:
            t = self.clock() if now is None else now
            for state in self.cluster.nodes.values():
                self.cluster.refresh_nic(state, t)
            model = self.cluster.calibration.model
            return ClusterStatus(nodes=[self._node_status(n) for n in self.cluster.order],
                                 active_plans=len(self.cluster.plans),
                                 startup_constant_s=model.tail_s,
                                 startup_samples=len(self.cluster.calibration.samples))

    def plan_of(self, plan_id: str) -> Plan | None:
        with self._lock:
            active = self.cluster.plans.get(plan_id)
            return active.plan if active else None

    # ---- helpers (lock held) -----------------------------------------------------------------
    def _node_status(self, name: str) -> NodeStatus:
        s = self.cluster.nodes[name]
        return NodeStatus(name=name, gpus=s.info.gpus, gpu_memory_gb=s.info.gpu_memory_gb,
                          gpu_free_gb=[round(f, 3) for f in s.gpu_free], nic_gbps_configured=s.info.nic_gbps,
                          nic_gbps_estimated=round(self.cluster.bandwidth_bps(s) / 1e9, 3),
                          active_fetches=len(s.nic), workers=len(s.workers),
                          resident_models=sorted(s.residency), schedulable=s.info.schedulable)

    def _node_metrics(self, name: str) -> None:
        s = self.cluster.nodes.get(name)
        if s is None or not self.per_node_metrics:
            return
        self.metrics.gpu_free_gb.labels(name).set(sum(s.gpu_free))
        self.metrics.nic_estimate_gbps.labels(name).set(self.cluster.bandwidth_bps(s) / 1e9)

    def _gauges(self) -> None:
        self.metrics.active_plans.set(len(self.cluster.plans))
        self.metrics.active_fetches.set(float(self.cluster.nfetch[: self.cluster.size].sum()))
        self.metrics.startup_tail_s.set(self.cluster.calibration.model.tail_s)
        self.metrics.startup_overlap_s.set(self.cluster.calibration.model.overlap_s)
