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


def test_per_node_startup_sends_a_tight_slo_to_the_node_that_starts_fast() -> None:
    """Two nodes with the same NIC; 'slow' really starts in 8 s after its fetch, 'fast' in 1 s
    (like V100 vs A10 in Figure 7). Once each has reported its own workers, ours places a function
    whose SLO only the fast node meets there; HydraServe (fetch + 2 s for every node) cannot tell
    them apart and takes the node with more free memory."""
    def cluster(policy: str) -> PlacementService:
        svc = PlacementService(policy, clock=lambda: 0.0)
        svc.register_node(NodeInfo(name="slow", gpus=1, gpu_memory_gb=48, nic_gbps=16), now=0.0)
        svc.register_node(NodeInfo(name="fast", gpus=1, gpu_memory_gb=40, nic_gbps=16), now=0.0)
        return svc

    ours, static = cluster("ours"), cluster("hydraserve")
    t = 0.0
    for i in range(6):
        for node, after in (("slow", 8.0), ("fast", 1.0)):
            fn = llama(f"f{node}{i}", size_gb=4.0, ttft_slo_s=60.0)
            plan = ours.plan(PlanRequest(function=fn, exclude_nodes=["fast" if node == "slow" else "slow"]), now=t)
            fetch_s = plan.stages[0].fetch_bytes * 8 / 16e9
            t += fetch_s + after
            ours.report(WorkerReport(plan_id=plan.plan_id, event="ready", stage=0, at=t,
                                     timings=WorkerTimings(fetch_s=fetch_s, fetch_bytes=plan.stages[0].fetch_bytes,
                                                           cold_start_s=fetch_s + after)), now=t)
            ours.report(WorkerReport(plan_id=plan.plan_id, event="released"), now=t)
    cal = ours.cluster.calibration
    assert cal.startup_for("slow").predict(1.0) > cal.startup_for("fast").predict(1.0) + 5
    fn = llama("g", size_gb=4.0, ttft_slo_s=5.0)
    chosen = ours.plan(PlanRequest(function=fn, dry_run=True), now=t + 100)
    assert chosen.nodes == ["fast"] and chosen.meets_slo
    assert static.plan(PlanRequest(function=fn, dry_run=True), now=t + 100).nodes == ["slow"]


def test_each_stage_of_a_group_calibrates_its_own_node_with_its_own_bytes() -> None:
    """A group's nodes fetch their stages in parallel: each report carries that stage's bytes
    and seconds, so each node learns its own bandwidth (not the group's total over one node's time)."""
    svc = PlacementService("ours", clock=lambda: 0.0)
    for name in ("a", "b"):
        svc.register_node(NodeInfo(name=name, gpus=1, gpu_memory_gb=40, nic_gbps=1), now=0.0)
    fn = llama("g", ttft_slo_s=90.0).model_copy(update={"min_pipeline_size": 2, "max_pipeline_size": 2})
    plan = svc.plan(PlanRequest(function=fn), now=0.0)
    assert plan.pipeline_size == 2
    for st in plan.stages:  # both really got 0.5 Gbit/s
        fetch_s = st.fetch_bytes * 8 / 0.5e9
        svc.report(WorkerReport(plan_id=plan.plan_id, event="ready", stage=st.stage.index, at=fetch_s,
                                timings=WorkerTimings(fetch_s=fetch_s, fetch_bytes=st.fetch_bytes)), now=fetch_s)
    svc.report(WorkerReport(plan_id=plan.plan_id, event="ready", timings=WorkerTimings(cold_start_s=70.0)), now=70.0)
    learned = svc.cluster.calibration.node_bps
    assert learned["a"] < 1e9 and learned["b"] < 1e9  # moved towards 0.5 Gbit/s, not above the 1 Gbit/s NIC
    assert abs(learned["a"] - learned["b"]) < 0.05e9


def test_a_start_up_that_fetched_its_own_weights_teaches_nothing() -> None:
    """A worker without a prefetch (the baselines, a node whose loaderd did not answer) spent its
    cold start fetching: its timings would make every start-up look slow."""
    svc = _svc("ours")
    before = (svc.cluster.calibration.model, dict(svc.cluster.calibration.node_bps))
    plan = svc.plan(PlanRequest(function=llama("g", ttft_slo_s=60.0)), now=0.0)
    ack = svc.report(WorkerReport(plan_id=plan.plan_id, event="ready", stage=0, at=40.0,
                                  timings=WorkerTimings(cold_start_s=40.0, sample=False)), now=40.0)
    assert ack.calibrated == [] and (svc.cluster.calibration.model, svc.cluster.calibration.node_bps) == before
