"""The placement service and a node's warm pool: its memory comes out of the node's budget (and
is refused when it does not fit), and the planner predicts an adoption's start-up, learned
from adopted workers' own reports, where an idle pooled runtime waits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hydraserve.contracts.plan import NodeInfo, PlanRequest, Residency, WorkerReport, WorkerTimings
from hydraserve.errors import ConflictError
from hydraserve.provider.calibration import PRIOR_ADOPT_TAIL_S
from hydraserve.provider.service import PlacementService
from tests.provider.builders import llama


def _free(svc: PlacementService, node: str) -> float:
    return sum(svc.cluster.nodes[node].gpu_free)


def test_the_pools_memory_comes_out_of_the_budget_and_is_refused_when_it_does_not_fit() -> None:
    svc = PlacementService("ours", clock=lambda: 0.0)
    node = NodeInfo(name="a", gpus=1, gpu_memory_gb=24, nic_gbps=16)
    svc.register_node(node.model_copy(update={"pool_size": 2, "pool_memory_gb": 0.3}), now=0.0)
    assert _free(svc, "a") == pytest.approx(23.7)
    plan = svc.plan(PlanRequest(function=llama("big", size_gb=13.0, ttft_slo_s=60.0)), now=0.0)  # 18 GB
    with pytest.raises(ConflictError, match=r"warm pool needs 8\.0 GB"):
        svc.register_node(node.model_copy(update={"pool_size": 8, "pool_memory_gb": 8.0}), now=0.0)
    assert svc.cluster.nodes["a"].info.pool_memory_gb == 0.3 and _free(svc, "a") == pytest.approx(23.7 - 18)
    svc.register_node(node.model_copy(update={"pool_size": 2, "pool_memory_gb": 0.3}), now=0.0)  # a reconcile:
    assert _free(svc, "a") == pytest.approx(23.7 - 18)  # the same pool is never refused, nothing double-counted
    svc.report(WorkerReport(plan_id=plan.plan_id, event="released"), now=1.0)
    assert _free(svc, "a") == pytest.approx(23.7)  # the pool's share stays taken
    with pytest.raises(ValidationError, match="exceed the device"):
        NodeInfo(name="b", gpus=1, gpu_memory_gb=24, pool_size=1, pool_memory_gb=30)


def _two_nodes_holding_the_model(pool_on_a: int) -> PlacementService:
    svc = PlacementService("ours", clock=lambda: 0.0)
    fn = llama("f", size_gb=4.0, layers=8)
    resident = [Residency(model_uri=fn.model_uri, layers=list(range(8)), embeddings=True, head=True)]
    svc.register_node(NodeInfo(name="a", gpus=1, gpu_memory_gb=40, nic_gbps=16, residency=resident,
                               pool_size=pool_on_a, pool_memory_gb=0.3 if pool_on_a else 0.0), now=0.0)
    svc.register_node(NodeInfo(name="b", gpus=1, gpu_memory_gb=48, nic_gbps=16, residency=resident), now=0.0)
    return svc


def test_a_tight_slo_goes_to_the_node_with_the_model_and_an_idle_pooled_runtime() -> None:
    """Both nodes hold the model; only a's pool can skip the process start. A 1 s SLO is met only
    there (the adoption's prior 0.5 s vs a process start's 2 s); once a's one pooled runtime is
    taken by a start under way, the next plan no longer counts on it."""
    svc = _two_nodes_holding_the_model(pool_on_a=1)
    fn = llama("f", size_gb=4.0, layers=8, ttft_slo_s=1.0)
    plan = svc.plan(PlanRequest(function=fn), now=0.0)
    assert plan.nodes == ["a"] and plan.stages[0].pooled and plan.meets_slo
    assert plan.predicted_ttft_s == pytest.approx(PRIOR_ADOPT_TAIL_S, abs=0.01)
    second = svc.plan(PlanRequest(function=fn, dry_run=True), now=0.1)
    assert not second.stages[0].pooled and not second.meets_slo  # a's runtime is being adopted
    svc.report(WorkerReport(plan_id=plan.plan_id, event="ready", stage=0, at=0.3,
                            timings=WorkerTimings(fetch_s=0.0, fetch_bytes=0, cold_start_s=0.3, adopted=True)), now=0.3)
    again = svc.plan(PlanRequest(function=fn, dry_run=True), now=0.4)
    assert again.nodes == ["a"] and again.stages[0].pooled  # ready: the pool has refilled
    without = _two_nodes_holding_the_model(pool_on_a=0).plan(PlanRequest(function=fn, dry_run=True), now=0.0)
    assert not without.meets_slo and not without.stages[0].pooled


def test_adopted_starts_teach_the_adoptions_model_and_leave_the_process_starts_alone() -> None:
    svc = _two_nodes_holding_the_model(pool_on_a=1)
    cal = svc.cluster.calibration
    before = cal.startup_for("a")
    t = 0.0
    for i in range(6):
        plan = svc.plan(PlanRequest(function=llama(f"f{i}", size_gb=4.0, layers=8, ttft_slo_s=1.0),
                                    exclude_nodes=["b"]), now=t)
        t += 0.2
        svc.report(WorkerReport(plan_id=plan.plan_id, event="ready", stage=0, at=t, timings=WorkerTimings(
            fetch_s=0.0, fetch_bytes=plan.stages[0].fetch_bytes, cold_start_s=0.2, adopted=True)), now=t)
        svc.report(WorkerReport(plan_id=plan.plan_id, event="released"), now=t)
    assert cal.startup_for("a", adopted=True).predict(0.0) == pytest.approx(0.2, abs=0.01)
    assert cal.startup_for("a") == before  # a process start's model learned nothing from them
