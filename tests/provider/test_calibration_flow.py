"""Reports feed calibration through the service, and the planner acts on what it learned."""

from __future__ import annotations

from hydraserve.contracts.plan import NodeInfo, PlanRequest, WorkerReport, WorkerTimings
from hydraserve.provider.service import PlacementService
from tests.provider.builders import llama


def _svc(policy: str) -> PlacementService:
    svc = PlacementService(policy, clock=lambda: 0.0)
    for name in ("a", "b"):
        svc.register_node(NodeInfo(name=name, gpus=2, gpu_memory_gb=40, nic_gbps=16), now=0.0)
    return svc


def _slow_cold_starts_on(svc: PlacementService, node: str, n: int) -> None:
    t = 0.0
    for i in range(n):
        plan = svc.plan(PlanRequest(function=llama(f"f{i}", ttft_slo_s=60.0), exclude_nodes=["b" if node == "a" else "a"]),
                        now=t)
        fetch_s = plan.stages[0].fetch_bytes * 8 / 4e9  # the NIC really gives 4 Gbps
        t += fetch_s + 8.0
        svc.report(WorkerReport(plan_id=plan.plan_id, event="ready", stage=0, at=t,
                                timings=WorkerTimings(fetch_s=fetch_s, fetch_bytes=plan.stages[0].fetch_bytes,
                                                      cold_start_s=fetch_s + 8.0)), now=t)
        svc.report(WorkerReport(plan_id=plan.plan_id, event="released"), now=t)


def test_learned_slow_nic_steers_placement_away() -> None:
    ours, static = _svc("ours"), _svc("hydraserve")
    _slow_cold_starts_on(ours, "a", 8)
    _slow_cold_starts_on(static, "a", 8)
    status = {n.name: n for n in ours.status(now=1e4).nodes}
    assert status["a"].nic_gbps_estimated < 6 and status["b"].nic_gbps_estimated == 16
    assert ours.cluster.calibration.model.tail_s > 4  # learned: far more than HydraServe's 2 s
    fn = llama("g", ttft_slo_s=60.0)
    assert ours.plan(PlanRequest(function=fn, dry_run=True), now=1e4).nodes == ["b"]
    assert static.cluster.calibration.model.tail_s == 2.0  # the static policy learns nothing


def test_learned_startup_changes_the_predicted_ttft() -> None:
    ours = _svc("ours")
    before = ours.plan(PlanRequest(function=llama("g", ttft_slo_s=60.0), dry_run=True), now=0.0).predicted_ttft_s
    _slow_cold_starts_on(ours, "a", 8)
    after = ours.plan(PlanRequest(function=llama("g", ttft_slo_s=60.0), dry_run=True,
                                  exclude_nodes=["a"]), now=1e4).predicted_ttft_s
    assert after > before + 4
