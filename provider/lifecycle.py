"""Commit a plan to the cluster model and apply worker reports to it (and to calibration).

The service calls these under its lock; the simulator calls the same functions at simulated
times, which is what makes the two agree. Committing reserves each worker's GPU memory and
registers each stage's fetch on its node's NIC with a deadline: the latest end at which the
plan still meets its TTFT SLO (or its predicted end, if later), so later plans cannot push it.
"""

from __future__ import annotations

import math

from hydraserve.contracts.plan import Plan, ReportAck, WorkerReport
from hydraserve.errors import NotFoundError
from hydraserve.provider.cluster import ActivePlan, ClusterState
from hydraserve.provider.policies import Policy


def fetch_key(plan_id: str, stage: int) -> str:
    return f"{plan_id}/{stage}"


def consolidation_key(plan_id: str, stage: int) -> str:
    """A full worker's fetch of the layers it lacks (after the group is ready)."""
    return f"{plan_id}/c{stage}"


def _start_consolidation(cluster: ClusterState, policy: Policy, active: ActivePlan, at: float) -> None:
    """Model the full workers' complement fetches (once): background (low priority: they yield
    to cold-start fetches, so they never break a deadline and never slow a prediction)."""
    plan = active.plan
    if plan.pipeline_size == 1 or active.consolidating:
        return
    active.consolidating = True
    size = sum(s.stage_bytes for s in plan.stages)
    for st in plan.stages:
        if st.full and st.node in cluster.nodes:
            bits = (size - st.stage_bytes) * 8 / policy.link_efficiency
            cluster.add_fetch(st.node, consolidation_key(plan.plan_id, st.stage.index), bits, math.inf, at,
                              background=True)


def _end_consolidation(cluster: ClusterState, plan: Plan, at: float) -> None:
    for st in plan.stages:
        if st.full:
            cluster.end_fetch(st.node, consolidation_key(plan.plan_id, st.stage.index), at)


def commit(cluster: ClusterState, policy: Policy, plan: Plan, ttft_slo_s: float, prefill_s: float,
           now: float) -> ActivePlan:
    """Reserve memory and bandwidth for ``plan`` (already decided against this state)."""
    rate = plan.pipeline_size - plan.full_workers + plan.full_workers / plan.pipeline_size
    for st in plan.stages:
        cluster.allocate(st.node, st.gpu, st.memory_gb, (plan.plan_id, st.stage.index))
    for st in plan.stages:
        if st.fetch_bytes > 0:
            bits = st.fetch_bytes * 8 / policy.link_efficiency
            after = (cluster.calibration.startup_for(st.node).after_fetch_s(st.stage_bytes / 1e9)
                     if policy.calibrated else 2.0)
            slack = max(0.0, ttft_slo_s - after - prefill_s * rate)
            deadline = now + max(st.predicted_fetch_s, slack)
            cluster.add_fetch(st.node, fetch_key(plan.plan_id, st.stage.index), bits, deadline, now)
    active = ActivePlan(plan=plan, created_at=now)
    cluster.plans[plan.plan_id] = active
    return active


def apply_report(cluster: ClusterState, policy: Policy, report: WorkerReport, now: float) -> ReportAck:
    """Ready: the stage's fetch is over (calibrate, note residency). Failed/released: free it all.
    Consolidated: the partial workers are gone, the full ones stay."""
    active = cluster.plans.get(report.plan_id)
    if active is None:
        raise NotFoundError(f"unknown plan {report.plan_id!r}", param="plan_id")
    at = report.at if report.at is not None else now
    plan = active.plan
    stages = [s for s in plan.stages if report.stage is None or s.stage.index == report.stage]
    calibrated: list[str] = []
    if report.event == "ready":
        for st in stages:
            sharing = cluster.end_fetch(st.node, fetch_key(plan.plan_id, st.stage.index), at)
            active.ready.add(st.stage.index)
            t = report.timings
            fetch_s = t.fetch_s if t.sample else None
            if fetch_s is not None:
                active.fetch_s[st.stage.index] = fetch_s
            if fetch_s is not None and st.fetch_bytes > 0:
                nbytes = t.fetch_bytes if t.fetch_bytes is not None else st.fetch_bytes
                state = cluster.nodes.get(st.node)
                if state is not None and cluster.calibration.observe_fetch(
                        st.node, nbytes * 8, fetch_s, sharing, state.info.nic_gbps * 1e9):
                    cluster.sync(state)
                    calibrated.append(f"bandwidth:{st.node}")
            if report.stage is not None and t.sample and t.cold_start_s is not None and cluster.calibration.observe_cold_start(
                    fetch_s or 0.0, t.cold_start_s, st.stage_bytes / 1e9, node=st.node, adopted=t.adopted):
                calibrated.append(f"startup:{st.node}")
            if policy.keeps_cache and st.node in cluster.nodes:
                cluster.add_residency(st.node, plan.model_uri, range(st.stage.layer_start, st.stage.layer_end),
                                      st.stage.is_first, st.stage.is_last)
        if report.stage is None or len(active.ready) == len(plan.stages):
            _start_consolidation(cluster, policy, active, at)
            if report.timings.sample and (report.stage is None or report.timings.cold_start_s is None):
                # one figure for the whole group: a cluster-wide sample of its slowest worker
                cold = report.timings.cold_start_s
                if cold is None:
                    cold = at - active.created_at
                fetch = max(active.fetch_s.values(), default=0.0)
                biggest_gb = max(s.stage_bytes for s in plan.stages) / 1e9
                if cluster.calibration.observe_cold_start(fetch, cold, biggest_gb, adopted=report.timings.adopted):
                    calibrated.append("startup")
    elif report.event in ("failed", "released"):
        _end_consolidation(cluster, plan, at)
        for st in stages:
            cluster.end_fetch(st.node, fetch_key(plan.plan_id, st.stage.index), at)
            cluster.free(st.node, (plan.plan_id, st.stage.index))
        if report.stage is None or all((plan.plan_id, s.stage.index) not in cluster.nodes[s.node].workers
                                       for s in plan.stages if s.node in cluster.nodes):
            cluster.plans.pop(plan.plan_id, None)
    elif report.event == "consolidated":
        _end_consolidation(cluster, plan, at)
        for st in plan.stages:
            if not st.full:
                cluster.free(st.node, (plan.plan_id, st.stage.index))
        if policy.keeps_cache:
            for st in plan.stages:
                if st.full and st.node in cluster.nodes:
                    cluster.add_residency(st.node, plan.model_uri, range(plan.stages[0].stage.num_layers),
                                          True, True)
    return ReportAck(plan_id=plan.plan_id, accepted=True, calibrated=calibrated)
