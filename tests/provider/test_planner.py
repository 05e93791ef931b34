"""Planner properties: memory never oversubscribed, deadlines kept, p = 1 when it suffices,
residency preferred, sensible fallback, determinism."""

from __future__ import annotations

import random

import pytest

from hydraserve.contracts.plan import NodeInfo, PlanRequest, Residency
from hydraserve.errors import OverloadedError
from hydraserve.provider.calibration import Calibration
from hydraserve.provider.cluster import ClusterState
from hydraserve.provider.lifecycle import commit
from hydraserve.provider.planner import Planner, memory_gb
from hydraserve.provider.policies import POLICIES, get_policy
from hydraserve.provider.service import PlacementService
from tests.provider.builders import llama, paper_nodes


def _service(policy: str = "ours", nodes: list[NodeInfo] | None = None) -> PlacementService:
    svc = PlacementService(policy, clock=lambda: 0.0)
    for n in nodes if nodes is not None else paper_nodes():
        svc.register_node(n, now=0.0)
    return svc


@pytest.mark.parametrize("policy", list(POLICIES))
def test_never_oversubscribes_gpu_memory(policy: str) -> None:
    svc = _service(policy)
    rng = random.Random(3)
    t = 0.0
    active: list[str] = []
    for i in range(200):
        t += rng.expovariate(0.5)
        if active and rng.random() < 0.4:
            from hydraserve.contracts.plan import WorkerReport
            svc.report(WorkerReport(plan_id=active.pop(rng.randrange(len(active))), event="released"), now=t)
            continue
        big = rng.random() < 0.5
        fn = llama(f"f{i % 9}", 26.0 if big else 13.5, 40 if big else 32, 12.0 if big else 7.5)
        try:
            plan = svc.plan(PlanRequest(function=fn), now=t)
        except OverloadedError:
            continue
        active.append(plan.plan_id)
        assert len(set(plan.nodes)) == plan.pipeline_size  # one stage per node
        for node in svc.cluster.nodes.values():
            assert all(f >= -1e-6 for f in node.gpu_free), node.gpu_free
            per_gpu = [0.0] * node.info.gpus
            for gpu, gb in node.workers.values():
                per_gpu[gpu] += gb
            assert all(u <= node.info.gpu_memory_gb + 1e-6 for u in per_gpu)


@pytest.mark.parametrize("policy", ["hydraserve", "hydraserve-cache", "ours"])
def test_never_breaks_a_running_fetch_deadline(policy: str) -> None:
    svc = _service(policy, [NodeInfo(name=f"n{i}", gpus=4, gpu_memory_gb=80, nic_gbps=16) for i in range(3)])
    t = 0.0
    for i in range(40):
        t += 0.3
        try:
            svc.plan(PlanRequest(function=llama(f"f{i}", 13.5, 32, 7.5)), now=t)
        except OverloadedError:
            pass
        for node in svc.cluster.nodes.values():
            ends, _ = node.nic.finish_times(t)
            for key, end in ends.items():
                assert end <= node.nic.fetches[key].deadline + 1e-6, (node.info.name, key)


def test_picks_p1_when_one_node_meets_the_slo() -> None:
    svc = _service("ours")
    plan = svc.plan(PlanRequest(function=llama(ttft_slo_s=30.0)), now=0.0)
    assert plan.pipeline_size == 1 and plan.meets_slo and plan.stages[0].full


def test_tight_slo_splits_and_balances_bytes() -> None:
    svc = _service("hydraserve")
    plan = svc.plan(PlanRequest(function=llama(ttft_slo_s=7.5)), now=0.0)
    assert plan.pipeline_size >= 2 and plan.meets_slo
    sizes = [s.stage_bytes for s in plan.stages]
    assert max(sizes) - min(sizes) <= max(llama().per_layer_bytes()) + llama().embed_bytes
    assert plan.stages[0].full and plan.stages[0].memory_gb == memory_gb(llama(), plan.pipeline_size, True)


def test_prefers_a_node_holding_the_model() -> None:
    fn = llama()
    nodes = paper_nodes()
    nodes[6] = nodes[6].model_copy(update={"residency": [Residency(model_uri=fn.model_uri, layers=list(range(32)),
                                                                   embeddings=True, head=True)]})
    svc = _service("ours", nodes)
    plan = svc.plan(PlanRequest(function=fn), now=0.0)
    assert plan.pipeline_size == 1 and plan.nodes == [nodes[6].name]
    assert plan.stages[0].source == "cache" and plan.stages[0].fetch_bytes == 0
    blind = _service("hydraserve", nodes).plan(PlanRequest(function=fn), now=0.0)
    assert nodes[6].name not in blind.nodes or blind.stages[0].fetch_bytes > 0


def test_fallback_when_nothing_meets_the_slo() -> None:
    svc = _service("hydraserve")
    plan = svc.plan(PlanRequest(function=llama(ttft_slo_s=0.5)), now=0.0)
    assert plan.fallback and not plan.meets_slo and plan.pipeline_size == 1
    fn = llama(ttft_slo_s=0.5)
    ours = _service("ours").plan(PlanRequest(function=fn), now=0.0)
    # the request misses whatever is chosen: one worker, never partial workers on other nodes
    assert ours.fallback and ours.pipeline_size == 1 and ours.stages[0].memory_gb == memory_gb(fn, 1, True)
    nodes = paper_nodes()
    nodes[6] = nodes[6].model_copy(update={"residency": [Residency(model_uri=fn.model_uri, layers=list(range(32)),
                                                                   embeddings=True, head=True)]})
    cached = _service("ours", nodes).plan(PlanRequest(function=fn), now=0.0)
    assert cached.fallback and cached.nodes == [nodes[6].name] and cached.stages[0].fetch_bytes == 0


def test_no_capacity_is_a_retryable_error() -> None:
    svc = _service("ours", [NodeInfo(name="tiny", gpus=1, gpu_memory_gb=8)])
    with pytest.raises(OverloadedError) as info:
        svc.plan(PlanRequest(function=llama()), now=0.0)
    assert info.value.retryable


def test_deterministic_for_the_same_state_and_requests() -> None:
    def run() -> list[tuple[str, ...]]:
        svc = _service("ours")
        out = []
        for i in range(30):
            try:
                p = svc.plan(PlanRequest(function=llama(f"f{i % 5}", ttft_slo_s=7.5 + i % 3)), now=i * 0.7)
                out.append((p.plan_id, *p.nodes))
            except OverloadedError:
                out.append(("none",))
        return out
    assert run() == run()


def test_dry_run_reserves_nothing() -> None:
    svc = _service("ours")
    before = svc.status(now=0.0).model_dump()
    plan = svc.plan(PlanRequest(function=llama(), dry_run=True), now=0.0)
    assert plan.candidates and svc.status(now=0.0).model_dump() == before


def test_planner_alone_matches_service() -> None:
    """The planner + lifecycle used directly (as the simulator does) decide like the service."""
    policy = get_policy("ours")
    cluster = ClusterState(Calibration(enabled=True))
    for n in paper_nodes():
        cluster.upsert_node(n, 0.0)
    planner = Planner(cluster, policy)
    svc = _service("ours")
    for i in range(12):
        fn = llama(f"f{i}", 13.5 if i % 2 else 26.0, 32 if i % 2 else 40, 7.5 if i % 2 else 12.0)
        try:
            a = planner.plan(PlanRequest(function=fn), now=float(i))
        except OverloadedError:
            with pytest.raises(OverloadedError):
                svc.plan(PlanRequest(function=fn), now=float(i))
            continue
        commit(cluster, policy, a, fn.ttft_slo_s, 0.0, float(i))
        b = svc.plan(PlanRequest(function=fn), now=float(i))
        assert a.model_dump() == b.model_dump()


def test_reregistering_a_node_keeps_allocations_and_residency_unless_given() -> None:
    fn = llama()
    held = Residency(model_uri=fn.model_uri, layers=list(range(32)), embeddings=True, head=True)
    node = NodeInfo(name="n", gpus=1, gpu_memory_gb=40, residency=[held])
    svc = _service("ours", [node])
    plan = svc.plan(PlanRequest(function=fn), now=0.0)
    assert plan.stages[0].source == "cache"
    svc.register_node(node.model_copy(update={"residency": None, "nic_gbps": 25.0}), now=1.0)
    state = svc.cluster.nodes["n"]
    assert state.gpu_free[0] == pytest.approx(40 - plan.stages[0].memory_gb)
    assert fn.model_uri in state.residency
    svc.register_node(node.model_copy(update={"residency": []}), now=2.0)
    assert not state.residency and "n" not in svc.cluster.holders.get(fn.model_uri, set())


def test_concurrent_plans_never_share_memory() -> None:
    """Many threads planning at once (the HTTP server's workers) get disjoint reservations."""
    import threading

    svc = PlacementService("ours")
    for i in range(3):
        svc.register_node(NodeInfo(name=f"n{i}", gpus=1, gpu_memory_gb=20))
    results: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            plan = svc.plan(PlanRequest(function=llama(f"f{i}", ttft_slo_s=60.0)))
            with lock:
                results.extend(plan.nodes)
        except OverloadedError:
            pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["n0", "n1", "n2"]  # 18.5 GB each: one per node, the rest refused


def test_a_forced_pipeline_size_is_honoured_even_when_one_worker_would_do() -> None:
    svc = _service("ours")
    fn = llama(ttft_slo_s=30.0).model_copy(update={"min_pipeline_size": 2, "max_pipeline_size": 2})
    plan = svc.plan(PlanRequest(function=fn), now=0.0)
    assert plan.pipeline_size == 2 and len(set(plan.nodes)) == 2
    with pytest.raises(ValueError, match="min_pipeline_size exceeds"):
        type(fn).model_validate({**llama().model_dump(), "min_pipeline_size": 3, "max_pipeline_size": 2})


def test_full_workers_stay_within_the_functions_bound() -> None:
    """With max_full_workers = 1 every split marks exactly one full worker, stage 0, even where
    more would help; with min_full_workers = 2 (a function asking for 2 replicas per group) every
    split marks stages 0 and 1."""
    for slo in (7.5, 9.0, 12.0):
        fn = llama(ttft_slo_s=slo).model_copy(update={"max_full_workers": 1})
        plan = _service("hydraserve").plan(PlanRequest(function=fn), now=0.0)
        assert plan.full_workers == 1 and [s.full for s in plan.stages] == [True] + [False] * (plan.pipeline_size - 1)
        assert all(c.full_workers <= 1 for c in plan.candidates)
        two = _service("hydraserve").plan(PlanRequest(function=llama(ttft_slo_s=slo).model_copy(
            update={"min_full_workers": 2})), now=0.0)
        assert two.full_workers == min(2, two.pipeline_size)
        assert [s.full for s in two.stages] == [i < 2 for i in range(two.pipeline_size)]
