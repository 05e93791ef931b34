"""The event loop: arrivals, cold starts on simulated NICs, serving, consolidation, scale to zero.

The planner is the live one: a PlacementService whose clock is the simulated time, so every
decision (and every calibration step, from the simulated workers' reports) runs the same code
as `hydraserve placement`. The simulator owns only the truth: true NIC bandwidths (its own
Nic objects), stage times (hydraserve.provider.sim.spec), host caches with LRU eviction, and
requests. Deterministic for a seed: arrivals come from a seeded generator and ties in the
event heap break by insertion order.

Keep-alive: ``fixed`` keeps an idle instance ``spec.keepalive_s``; ``histogram`` runs the live
gateway's own policy code (provider/keepalive.py: one InvocationHistory per function, fed as the
function turns busy and idle): an instance stays to the end of the keep-alive window, or goes at
once when the function will be pre-warmed, which fetches its stages into the host cache of the
nodes a dry-run plan picks (background fetches on their NICs, within the cache budget, LRU) and
counts the bytes no cold start used before the window ended.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from hydraserve.contracts.plan import (
    FunctionSpec,
    NodeInfo,
    Plan,
    PlanRequest,
    Residency,
    StagePlacement,
    WorkerReport,
    WorkerTimings,
)
from hydraserve.errors import OverloadedError
from hydraserve.provider.keepalive import (
    IdleHistogram,
    InvocationHistory,
    KeepAlive,
    PolicySettings,
    instance_keep_alive_s,
    without_prewarm,
)
from hydraserve.provider.lifecycle import consolidation_key
from hydraserve.provider.network import Nic
from hydraserve.provider.policies import Policy, get_policy
from hydraserve.provider.service import PlacementService
from hydraserve.provider.sim.spec import GB, GOODPUT, SimSpec
from hydraserve.provider.sim.workload import Arrivals

ARRIVAL, NIC, READY, DONE, IDLE, CONSOLIDATED, RETRY, PREWARM = range(8)
RETRY_FUNCTIONS = 8  # waiting functions that retry after each release


@dataclass
class Instance:
    fn: int
    plan: Plan
    started: float
    rate: float  # serving slowdown while pipelined (1 after consolidation)
    hop_s: float
    ready_at: float | None = None
    busy: int = 0
    idle_token: int = 0
    fetch_end: dict[int, float] = field(default_factory=dict)
    worker_ready: dict[int, float] = field(default_factory=dict)  # each stage's own ready time
    released: bool = False
    waiting: list[int] = field(default_factory=list)  # request ids joined before ready
    complement: set[str] = field(default_factory=set)  # consolidation fetches still running
    memory_gb: float = 0.0
    capacity: int = 8  # requests batched at once: 8 per worker while pipelined, per full worker after
    whole: bool = False  # one stage from the start, or consolidated: what HydraServe profiles TPOT on


@dataclass
class Result:
    """Per-request outcome arrays plus totals."""

    ttft: np.ndarray
    slo: np.ndarray
    tpot: np.ndarray
    tpot_slo: np.ndarray
    kind: np.ndarray  # 0 warm, 1 cold (started it), 2 joined a starting instance
    cost_gb_s: float
    cold_starts: int
    pipeline_sizes: dict[int, int]
    sim_end_s: float
    prewarms: int = 0
    prefetched_gb: float = 0.0  # bytes pre-warms fetched into host caches
    prefetched_unused_gb: float = 0.0  # of those, what no cold start used before its window ended


@dataclass
class Prewarm:
    fn: int
    nodes: set[str]
    gb: float
    until: float
    used: bool = False


class Simulator:
    def __init__(self, spec: SimSpec, policy: Policy | str, arrivals: Arrivals, keep_alive: str = "fixed",
                 histogram_bin_s: float = 60.0, histogram_range_s: float = 4 * 3600.0) -> None:
        if keep_alive not in ("fixed", "histogram"):
            raise ValueError(f"keep_alive must be fixed or histogram, not {keep_alive!r}")
        self.spec = spec
        self.keep_alive_mode = keep_alive
        self.histories = [InvocationHistory(IdleHistogram(histogram_bin_s, histogram_range_s),
                                            PolicySettings(fixed_keep_alive_s=spec.keepalive_s))
                          for _ in spec.functions]
        self.active = [0] * len(spec.functions)  # requests arrived and not done, per function
        self.prewarm_token = [0] * len(spec.functions)
        self.prewarming: dict[str, tuple[Prewarm, str, StagePlacement]] = {}  # NIC key -> (record, node, stage)
        self.prewarms: list[Prewarm] = []
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.arrivals = arrivals
        self.now = 0.0
        self.service = PlacementService(self.policy, clock=lambda: self.now, per_node_metrics=False)
        self.nics = {n.name: Nic(n.true_nic_gbps * 1e9 * GOODPUT) for n in spec.nodes}
        self.nic_version = dict.fromkeys(self.nics, 0)
        self.node_spec = {n.name: n for n in spec.nodes}
        self.cache: dict[str, OrderedDict[str, float]] = {n.name: OrderedDict() for n in spec.nodes}
        self.fetch_owner: dict[str, tuple[Instance, int]] = {}
        self.consolidating: dict[str, Instance] = {}  # complement fetch key -> instance
        self.instances: list[list[Instance]] = [[] for _ in spec.functions]
        # requests waiting for capacity, per function; functions in order of their oldest waiter
        self.pending: OrderedDict[int, deque[int]] = OrderedDict()
        self.heap: list[tuple[float, int, int, object]] = []
        self.seq = itertools.count()
        n = len(arrivals.times)
        self.ttft = np.full(n, np.nan)
        self.tpot = np.full(n, np.nan)
        self.kind = np.zeros(n, dtype=np.int8)
        self.profiled = np.zeros(len(spec.functions), dtype=bool)  # a request ran on a one-stage instance
        self.cost = 0.0
        self.mem_used = 0.0
        self.cost_at = 0.0
        self.cold_starts = 0
        self.psizes: dict[int, int] = {}
        for node in spec.nodes:
            self.service.register_node(NodeInfo(name=node.name, gpus=node.gpus, gpu_memory_gb=node.gpu_memory_gb,
                                                nic_gbps=node.nic_gbps), now=0.0)

    # ---- loop --------------------------------------------------------------------------------
    def push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, payload))

    def run(self) -> Result:
        times, n = self.arrivals.times, len(self.arrivals.times)
        i = 0
        while i < n or self.heap:
            if i < n and (not self.heap or times[i] <= self.heap[0][0]):
                self._advance(float(times[i]))
                self._arrive(i)
                i += 1
                continue
            t, _, kind, payload = heapq.heappop(self.heap)
            self._advance(t)
            if kind == NIC:
                self._nic_event(payload)  # type: ignore[arg-type]
            elif kind == READY:
                self._ready(payload)  # type: ignore[arg-type]
            elif kind == DONE:
                self._done(payload)  # type: ignore[arg-type]
            elif kind == IDLE:
                self._idle(payload)  # type: ignore[arg-type]
            elif kind == CONSOLIDATED:
                self._consolidated(payload)  # type: ignore[arg-type]
            elif kind == RETRY:
                self._retry_pending()
            elif kind == PREWARM:
                self._prewarm(payload)  # type: ignore[arg-type]
        fns = self.spec.functions
        slo = np.array([fns[f].ttft_slo_s for f in self.arrivals.functions])
        tpot_slo = np.array([fns[f].tpot_slo_s for f in self.arrivals.functions])
        return Result(ttft=self.ttft, slo=slo, tpot=self.tpot, tpot_slo=tpot_slo, kind=self.kind, cost_gb_s=self.cost,
                      cold_starts=self.cold_starts, pipeline_sizes=self.psizes, sim_end_s=self.now,
                      prewarms=len(self.prewarms), prefetched_gb=sum(p.gb for p in self.prewarms),
                      prefetched_unused_gb=sum(p.gb for p in self.prewarms if not p.used))

    def _advance(self, t: float) -> None:
        self.cost += self.mem_used * (t - self.cost_at)
        self.cost_at = t
        self.now = t

    # ---- requests ----------------------------------------------------------------------------
    def _arrive(self, req: int) -> None:
        fn = int(self.arrivals.functions[req])
        if self.active[fn] == 0:  # the function turns busy: its idle time ends, a pending pre-warm is moot
            self.histories[fn].busy(self.now)
            self.prewarm_token[fn] += 1
        self.active[fn] += 1
        best = None
        for inst in self.instances[fn]:
            if inst.busy < inst.capacity and (best is None or _prefer(inst, best)):
                best = inst
        if best is not None:
            self._assign(best, req, cold=False)
            return
        if not self._start(fn, req):
            self.pending.setdefault(fn, deque()).append(req)

    def _assign(self, inst: Instance, req: int, cold: bool) -> None:
        inst.busy += 1
        inst.idle_token += 1
        if inst.ready_at is None:
            self.kind[req] = 1 if cold else 2
            inst.waiting.append(req)
        else:
            self._serve(inst, req)

    def _serve(self, inst: Instance, req: int) -> None:
        fn = self.spec.functions[inst.fn]
        start = max(self.now, inst.ready_at or self.now)
        prefill = (fn.prefill_s or 0.0) * inst.rate
        tpot = (fn.tpot_s or 0.0) * inst.rate + inst.hop_s
        self.ttft[req] = start + prefill - float(self.arrivals.times[req])
        self.tpot[req] = tpot
        self.push(start + prefill + self.spec.output_tokens * tpot, DONE, inst)

    def _done(self, inst: Instance) -> None:
        inst.busy -= 1
        self.active[inst.fn] -= 1
        if self.active[inst.fn] == 0:
            self._function_idle(inst.fn)
        if inst.whole:
            self.profiled[inst.fn] = True
        if self._serve_pending(inst):
            return
        if inst.busy == 0:
            inst.idle_token += 1
            self.push(self.now + self._keep_alive_s(inst.fn), IDLE, (inst, inst.idle_token))

    # ---- keep-alive and pre-warm (the gateway's policy code) ------------------------------------
    def keep_alive(self, fn: int) -> KeepAlive:
        if self.keep_alive_mode == "fixed":
            return KeepAlive(0.0, self.spec.keepalive_s, "fixed")
        decision = self.histories[fn].decision()
        return decision if self.policy.keeps_cache else without_prewarm(decision)  # no cache to pre-warm

    def _keep_alive_s(self, fn: int) -> float:
        return instance_keep_alive_s(self.keep_alive(fn), self.active[fn] == 0, self.spec.keepalive_s)

    def _function_idle(self, fn: int) -> None:
        self.histories[fn].idle(self.now)
        decision = self.keep_alive(fn)
        if decision.prewarm_s > 0:
            self.push(self.now + decision.prewarm_s, PREWARM, (fn, self.prewarm_token[fn], decision.keep_alive_s))

    def _prewarm(self, payload: tuple[int, int, float]) -> None:
        fn, token, hold_s = payload
        if token != self.prewarm_token[fn] or self.instances[fn]:  # busy again, or back up meanwhile
            return
        try:
            plan = self.service.plan(PlanRequest(function=self.spec.functions[fn], dry_run=True), now=self.now)
        except OverloadedError:
            return
        todo = [st for st in plan.stages if st.fetch_bytes > 0]
        if not todo:
            return  # every stage is resident already
        record = Prewarm(fn, {st.node for st in todo}, sum(st.fetch_bytes for st in todo) / GB, self.now + hold_s)
        self.prewarms.append(record)
        for st in todo:
            key = f"prewarm/{len(self.prewarms)}/{st.stage.index}"
            self.prewarming[key] = (record, st.node, st)
            self.nics[st.node].add(key, st.fetch_bytes * 8.0, math.inf, self.now, background=True)
            self._schedule_nic(st.node)

    def _prewarm_fetched(self, key: str) -> None:
        record, node, st = self.prewarming.pop(key)
        uri = self.spec.functions[record.fn].model_uri
        stage = st.stage
        self.service.cluster.add_residency(node, uri, range(stage.layer_start, stage.layer_end), stage.is_first,
                                           stage.is_last)
        self._cache_put(node, uri, st.stage_bytes / GB)

    def _serve_pending(self, inst: Instance) -> bool:
        """Give ``inst`` its function's waiting requests up to capacity; True if any."""
        queue = self.pending.get(inst.fn)
        took = False
        while queue and inst.busy < inst.capacity:
            self._assign(inst, queue.popleft(), cold=False)
            took = True
        if queue is not None and not queue:
            del self.pending[inst.fn]
        return took

    def _idle(self, payload: tuple[Instance, int]) -> None:
        inst, token = payload
        if inst.released or inst.busy or token != inst.idle_token:
            return
        inst.released = True
        self.instances[inst.fn].remove(inst)
        for key in inst.complement:  # scaled to zero before consolidating: stop those fetches
            self.consolidating.pop(key, None)
            node = next(s.node for s in inst.plan.stages if consolidation_key(inst.plan.plan_id, s.stage.index) == key)
            self.nics[node].remove(key, self.now)
            self._schedule_nic(node)
        inst.complement.clear()
        self.service.report(WorkerReport(plan_id=inst.plan.plan_id, event="released"), now=self.now)
        self.mem_used -= inst.memory_gb
        self._retry_pending()

    # ---- cold starts -------------------------------------------------------------------------
    def _start(self, fn_index: int, req: int) -> bool:
        fn = self.spec.functions[fn_index]
        waited = self.now - float(self.arrivals.times[req])
        if waited > 0:  # HydraServe plans with the SLO left: ttft_slo - max_waiting_time (scheduler.py)
            fn = fn.model_copy(update={"ttft_slo_s": max(fn.ttft_slo_s - waited, 1e-3)})
        if self.policy.tpot_after_profile and not self.profiled[fn_index]:
            fn = fn.model_copy(update={"tpot_s": None})  # TPOT unknown: no TPOT check yet
        try:
            plan = self.service.plan(PlanRequest(function=fn), now=self.now)
        except OverloadedError:
            return False
        self.cold_starts += 1
        self.psizes[plan.pipeline_size] = self.psizes.get(plan.pipeline_size, 0) + 1
        cached = {st.node for st in plan.stages if st.source == "cache"}
        for record in self.prewarms:
            if record.fn == fn_index and not record.used and self.now <= record.until and record.nodes & cached:
                record.used = True
        extra = plan.pipeline_size - 1
        inst = Instance(fn=fn_index, plan=plan, started=self.now, rate=1.0 + self.spec.times.pipeline_overhead * extra,
                        hop_s=self.spec.times.hop_s * extra,
                        memory_gb=sum(s.memory_gb for s in plan.stages),
                        capacity=self.spec.capacity * plan.pipeline_size, whole=plan.pipeline_size == 1)
        self.mem_used += inst.memory_gb
        self.instances[fn_index].append(inst)
        for st in plan.stages:
            if st.fetch_bytes > 0:
                key = f"{plan.plan_id}/{st.stage.index}"
                self.fetch_owner[key] = (inst, st.stage.index)
                self.nics[st.node].add(key, st.fetch_bytes * 8.0, math.inf, self.now)
                self._schedule_nic(st.node)
            else:
                inst.fetch_end[st.stage.index] = self.now
        self._assign(inst, req, cold=True)
        self._serve_pending(inst)
        if len(inst.fetch_end) == len(plan.stages):
            self._group_fetched(inst)
        return True

    def _schedule_nic(self, node: str) -> None:
        self.nic_version[node] += 1
        t = self.nics[node].next_finish(self.now)
        if t is not None:
            self.push(t, NIC, (node, self.nic_version[node]))

    def _nic_event(self, payload: tuple[str, int]) -> None:
        node, version = payload
        if version != self.nic_version[node]:
            return
        nic = self.nics[node]
        nic.advance(self.now)
        for fetch, end in nic.drain_finished():
            if fetch.key in self.consolidating:
                self._complement_fetched(self.consolidating.pop(fetch.key), fetch.key, end)
                continue
            if fetch.key in self.prewarming:
                self._prewarm_fetched(fetch.key)
                continue
            inst, stage = self.fetch_owner.pop(fetch.key)
            inst.fetch_end[stage] = end
            if len(inst.fetch_end) == len(inst.plan.stages):
                self._group_fetched(inst)
        self._schedule_nic(node)

    def _group_fetched(self, inst: Instance) -> None:
        """All stages fetched: each worker's ready time from the stage-time model; group = slowest."""
        fn = self.spec.functions[inst.fn]
        ready = inst.started
        for st in inst.plan.stages:
            t = self.spec.gpu_times[self.node_spec[st.node].gpu_kind]
            end = inst.fetch_end[st.stage.index]
            size_gb = fn.model_size_bytes / GB
            if self.policy.startup == "sequential":
                r = end + t.seq_const_s + t.seq_per_gb_s * size_gb
            elif self.policy.startup == "serverlessllm":
                if st.fetch_bytes == 0:
                    r = inst.started + t.sllm_hit_const_s + t.sllm_hit_per_gb_s * size_gb
                else:
                    r = end + t.sllm_miss_const_s + t.sllm_miss_per_gb_s * size_gb
            else:
                r = max(end, inst.started + t.overlap_s) + t.tail_s + t.tail_per_gb_s * st.stage_bytes / GB
            inst.worker_ready[st.stage.index] = r
            ready = max(ready, r)
        self.push(ready, READY, inst)

    def _ready(self, inst: Instance) -> None:
        inst.ready_at = self.now
        plan = inst.plan
        for st in plan.stages:
            fetch_s = inst.fetch_end[st.stage.index] - inst.started
            self.service.report(WorkerReport(
                plan_id=plan.plan_id, event="ready", stage=st.stage.index, at=self.now,
                timings=WorkerTimings(fetch_s=fetch_s, fetch_bytes=st.fetch_bytes,
                                      cold_start_s=inst.worker_ready[st.stage.index] - inst.started)), now=self.now)
            if self.policy.keeps_cache:
                self._cache_put(st.node, plan.model_uri, st.stage_bytes / GB)
        for req in inst.waiting:
            self._serve(inst, req)
        inst.waiting.clear()
        if plan.pipeline_size > 1 and plan.full_workers > 0:
            # full workers fetch the layers they lack on their (shared) NICs, then load them
            size = self.spec.functions[inst.fn].model_size_bytes
            for st in plan.stages:
                if st.full:
                    key = consolidation_key(plan.plan_id, st.stage.index)
                    self.consolidating[key] = inst
                    inst.complement.add(key)
                    self.nics[st.node].add(key, (size - st.stage_bytes) * 8.0, math.inf, self.now, background=True)
                    self._schedule_nic(st.node)

    def _complement_fetched(self, inst: Instance, key: str, end: float) -> None:
        inst.complement.discard(key)
        if not inst.complement and not inst.released:
            size = self.spec.functions[inst.fn].model_size_bytes
            rest = size - min(s.stage_bytes for s in inst.plan.stages if s.full)
            self.push(end + rest / GB / self.spec.times.pcie_gbps_bytes, CONSOLIDATED, inst)

    def _consolidated(self, inst: Instance) -> None:
        if inst.released:
            return
        self.service.report(WorkerReport(plan_id=inst.plan.plan_id, event="consolidated"), now=self.now)
        freed = sum(s.memory_gb for s in inst.plan.stages if not s.full)
        self.mem_used -= freed
        inst.memory_gb -= freed
        inst.rate, inst.hop_s, inst.whole = 1.0, 0.0, True
        inst.capacity = self.spec.capacity * max(1, inst.plan.full_workers)  # each full worker serves on
        self._serve_pending(inst)
        if self.policy.keeps_cache:
            fn = self.spec.functions[inst.fn]
            for st in inst.plan.stages:
                if st.full:
                    self._cache_put(st.node, inst.plan.model_uri, fn.model_size_bytes / GB)
        self._retry_pending()

    def _retry_pending(self) -> None:
        """Resources were freed: each waiting function (oldest first, at most RETRY_FUNCTIONS of
        them, like independent per-function activators) tries to start an instance."""
        tried = 0
        for fn in list(self.pending):
            if tried >= RETRY_FUNCTIONS:
                break
            queue = self.pending.get(fn)
            if not queue:
                self.pending.pop(fn, None)
                continue
            tried += 1
            req = queue.popleft()
            if not self._start(fn, req):
                queue.appendleft(req)
            elif not queue:
                self.pending.pop(fn, None)

    # ---- host cache (loaderd residency) --------------------------------------------------------
    def _cache_put(self, node: str, uri: str, gb: float) -> None:
        lru = self.cache[node]
        lru[uri] = max(gb, lru.get(uri, 0.0))
        lru.move_to_end(uri)
        budget = self.node_spec[node].cache_gb
        evicted = False
        while sum(lru.values()) > budget and len(lru) > 1:
            lru.popitem(last=False)
            evicted = True
        if evicted:  # the node's loaderd re-registers with what it still holds
            state = self.service.cluster.nodes[node]
            held = [Residency(model_uri=uri, layers=sorted(r.layers), embeddings=r.embeddings, head=r.head)
                    for uri, r in state.residency.items() if uri in lru]
            self.service.register_node(state.info.model_copy(update={"residency": held}), now=self.now)


def _prefer(a: Instance, b: Instance) -> bool:
    """Ready beats starting; then the less busy."""
    if (a.ready_at is None) != (b.ready_at is None):
        return a.ready_at is not None
    return a.busy < b.busy


def summarize(result: Result, functions: list[FunctionSpec]) -> dict[str, float]:
    ok = ~np.isnan(result.ttft)
    ttft = result.ttft[ok]
    met = (result.ttft <= result.slo) & ok
    n = len(result.ttft)
    return {
        "requests": int(n),
        "served": int(ok.sum()),
        "slo_attainment": float(met.sum() / n) if n else 0.0,
        "ttft_p50_s": float(np.percentile(ttft, 50)) if len(ttft) else math.nan,
        "ttft_p99_s": float(np.percentile(ttft, 99)) if len(ttft) else math.nan,
        "tpot_mean_s": float(np.nanmean(result.tpot)) if ok.any() else math.nan,
        "cost_gb_s": float(result.cost_gb_s),
        "cold_starts": int(result.cold_starts),
        "cold_attainment": float(met[result.kind == 1].mean()) if (result.kind == 1).any() else math.nan,
        "warm_fraction": float((result.kind == 0).mean()) if n else math.nan,  # found a ready instance
        "tpot_attainment": float((result.tpot[ok] <= result.tpot_slo[ok] + 1e-12).mean()) if ok.any() else math.nan,
        "prewarms": int(result.prewarms),
        "prefetched_gb": float(result.prefetched_gb),
        "prefetched_unused_gb": float(result.prefetched_unused_gb),
    }
