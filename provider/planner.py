"""The placement decision: pipeline size, full workers, memory, nodes and layer ranges.

Called by the service (POST /v1/plan, `hydraserve plan`) and by the simulator with the same
ClusterState type, so a decision depends only on (state, request, now, policy). The search is
HydraServe's (its artifact's algs.py; docs/PLACEMENT.md walks the steps): p = 1..4, a = min(p, required)..p full workers, first candidate
whose predicted TTFT and TPOT meet the SLOs wins; otherwise a fallback. What we add: stage
fetch times from a processor-sharing NIC model with deadlines, loaderd residency, peers, and the
calibrated start-up model. ``plan`` decides only; ``hydraserve.provider.lifecycle`` commits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from hydraserve.contracts.plan import Candidate, FetchSource, FunctionSpec, Plan, PlanRequest, StagePlacement
from hydraserve.contracts.stage import StagePlan, StageSpec
from hydraserve.errors import OverloadedError
from hydraserve.provider.cluster import MEM_EPS, ClusterState, NodeState
from hydraserve.provider.policies import Policy
from hydraserve.provider.stages import balanced_stage_plan, stage_bytes

POOL_SIZE = 24  # nodes examined in detail per decision (plus every node holding the model)
PIPELINE_STEP_S = 0.001  # TPOT cost per extra stage (HydraServe: 1 ms x (p - 1))


def memory_gb(spec: FunctionSpec, p: int, full: bool) -> float:
    """ceil((S + KV)/p) partial, ceil(S + KV) full; to 0.1 GB so tiny demo models stay tiny."""
    need = spec.model_gb + spec.kv_reserve_gb
    return math.ceil((need if full else need / p) * 10 - 1e-9) / 10


def slowdown(p: int, a: int) -> float:
    """HydraServe's rate: p - a + a/p (prefill and TPOT multiplier of a p-stage group)."""
    return p - a + a / p


@dataclass
class Option:
    """One node for one stage, as evaluated."""

    state: NodeState
    gpu: int
    fetch_bytes: int
    fetch_end: float
    source: FetchSource
    peers: list[str]
    ready: float = 0.0  # predicted seconds from now until this worker is ready
    pooled: bool = False  # predicted as an adoption from the node's warm pool


Choice = tuple[Candidate, StagePlan, list[int], list[Option], int]  # candidate, split, stage bytes, nodes, a


class Planner:
    """Stateless apart from the cluster it reads; one instance per (cluster, policy)."""

    def __init__(self, cluster: ClusterState, policy: Policy) -> None:
        self.cluster = cluster
        self.policy = policy

    # ---- public ------------------------------------------------------------------------------
    def plan(self, request: PlanRequest, now: float) -> Plan:
        spec = request.function
        pol = self.policy
        excluded = set(request.exclude_nodes)
        pool = self._pool(spec, excluded, now)
        per_layer = spec.per_layer_bytes()
        max_p = min(pol.max_pipeline_size, spec.max_pipeline_size, spec.num_layers)
        self._memo: dict[tuple[int, int], list[Option]] = {}
        candidates: list[Candidate] = []
        feasible: list[Choice] = []
        chosen: Choice | None = None
        for p in range(min(spec.min_pipeline_size, max_p), max_p + 1):
            splan = balanced_stage_plan(per_layer, spec.embed_bytes, spec.head_bytes, p)
            sbytes = stage_bytes(per_layer, spec.embed_bytes, spec.head_bytes, splan, spec.tied_bytes)
            for a in range(min(p, spec.min_full_workers), min(p, max(spec.max_full_workers, spec.min_full_workers)) + 1):
                rate = slowdown(p, a)
                tpot = (spec.tpot_s or 0.0) * rate + PIPELINE_STEP_S * (p - 1)
                if spec.tpot_s is not None and tpot > spec.tpot_slo_s:
                    candidates.append(Candidate(pipeline_size=p, full_workers=a, predicted_tpot_s=tpot,
                                                feasible=False, reason=f"TPOT {tpot:.3f} s > SLO"))
                    continue
                opts = self._assign(spec, splan, sbytes, a, pool, now)
                if isinstance(opts, str):
                    candidates.append(Candidate(pipeline_size=p, full_workers=a, feasible=False, reason=opts))
                    continue
                ready = max(o.ready for o in opts)
                ttft = ready + (spec.prefill_s or 0.0) * rate
                meets = ttft <= spec.ttft_slo_s
                cand = Candidate(pipeline_size=p, full_workers=a, nodes=[o.state.info.name for o in opts],
                                 predicted_ttft_s=round(ttft, 4), predicted_tpot_s=round(tpot, 5),
                                 feasible=True, meets_slo=meets,
                                 reason="meets both SLOs" if meets else f"TTFT {ttft:.2f} s > SLO")
                candidates.append(cand)
                feasible.append((cand, splan, sbytes, opts, a))
                if meets:
                    chosen = feasible[-1]
                    break
            if chosen is not None:
                break
        fallback = chosen is None
        if chosen is None:
            chosen = self._fallback(feasible, spec, pool, candidates, now)
            if chosen is None:
                raise OverloadedError(
                    f"no node can take {spec.name}: needs {memory_gb(spec, 1, True)} GB "
                    f"(or {memory_gb(spec, max_p, False)} GB per stage) and NIC headroom",
                    code="no_capacity", retry_after_s=1.0)
        return self._build(request, chosen, candidates, fallback, now)

    # ---- node pool ---------------------------------------------------------------------------
    def _pool(self, spec: FunctionSpec, excluded: set[str], now: float) -> list[NodeState]:
        """Nodes worth a detailed look: memory for the smallest stage, best NIC share, holders."""
        c = self.cluster
        n = c.size
        if n == 0:
            return []
        smallest = memory_gb(spec, min(self.policy.max_pipeline_size, spec.max_pipeline_size), False)
        ok = c.schedulable[:n] & (c.max_free[:n] + MEM_EPS >= smallest)
        rows = np.flatnonzero(ok)
        if self.policy.node_choice == "first_fit":
            picked = rows[:POOL_SIZE]
        elif len(rows) > POOL_SIZE:
            share = c.bps[:n][rows] / (c.nfetch[:n][rows] + 1.0)
            top = np.argpartition(-share, POOL_SIZE - 1)[:POOL_SIZE]
            picked = np.sort(rows[top])
        else:
            picked = rows
        names = {c.order[int(r)] for r in picked}
        if self.policy.cache_aware:
            names |= {h for h in c.holders.get(spec.model_uri, ()) if c.nodes[h].info.schedulable
                      and c.max_free[c.nodes[h].row] + MEM_EPS >= smallest}
        names -= excluded
        out = [c.nodes[name] for name in names]
        out.sort(key=lambda s: s.row)
        for s in out:
            c.refresh_nic(s, now)
        return out

    # ---- stage assignment --------------------------------------------------------------------
    def _assign(self, spec: FunctionSpec, splan: StagePlan, sbytes: list[int], a: int,
                pool: list[NodeState], now: float) -> list[Option] | str:
        """Stages 0..a-1 are full workers, placed first (HydraServe's masters); each stage takes
        the best-ranked unused node with a device that fits it."""
        p = len(splan.stages)
        used: set[str] = set()
        out: list[Option] = []
        for s in range(p):
            need = memory_gb(spec, p, full=s < a)
            chosen: Option | None = None
            for offer in self._ranked(spec, splan.stages[s], sbytes[s], pool, now):
                if offer.state.info.name in used:
                    continue
                gpu = _best_fit_gpu(offer.state.gpu_free, need)
                if gpu >= 0:
                    chosen = replace(offer, gpu=gpu)
                    break
            if chosen is None:
                return f"stage {s}: no node with {need} GB free and NIC headroom"
            out.append(chosen)
            used.add(chosen.state.info.name)
        return out

    def _ranked(self, spec: FunctionSpec, stage: StageSpec, nbytes: int, pool: list[NodeState],
                now: float) -> list[Option]:
        """Pool nodes that can take this stage's fetch, best first; computed once per decision."""
        key = (stage.num_stages, stage.index)
        got = self._memo.get(key)
        if got is None:
            got = []
            for state in pool:
                ok, fetch, end, source, peers = self._fetch_offer(spec, stage, nbytes, state, now)
                if ok:
                    pooled = self.policy.calibrated and self.cluster.pool_idle(state) > 0
                    got.append(Option(state, -1, fetch, end, source, peers,
                                      self._ready_s(state, end - now, nbytes, pooled), pooled))
            if self.policy.node_choice != "first_fit":
                got.sort(key=self._score)
            self._memo[key] = got
        return got

    def _ready_s(self, state: NodeState, fetch_s: float, nbytes: int, pooled: bool) -> float:
        """Predicted start-up of one worker: the node's calibrated model (an adoption's when its
        warm pool has an idle runtime), or HydraServe's fetch + 2 s."""
        if self.policy.calibrated:
            model = self.cluster.calibration.startup_for(state.info.name, adopted=pooled)
            return model.predict(fetch_s, nbytes / 1e9)
        return fetch_s + 2.0

    def _score(self, opt: Option) -> tuple[float, ...]:
        """Earliest predicted ready first (HydraServe: earliest landing, the same order as its
        fetch + 2 s); locality: fewest bytes to fetch first; then most free memory."""
        if self.policy.node_choice == "locality":
            return (float(opt.fetch_bytes), opt.fetch_end, float(opt.state.row))
        return (opt.ready, opt.fetch_end, -max(opt.state.gpu_free, default=0.0), float(opt.state.row))

    def _fetch_offer(self, spec: FunctionSpec, stage: StageSpec, nbytes: int, state: NodeState,
                     now: float) -> tuple[bool, int, float, FetchSource, list[str]]:
        fetch = nbytes
        source: FetchSource = "s3"
        peers: list[str] = []
        if self.policy.cache_aware and self.cluster.holders.get(spec.model_uri):
            fetch = nbytes - _resident_bytes(state, spec, stage)
            if fetch <= 0:
                return True, 0, now, "cache", []
            if self.policy.peers:
                peers = self._peers(spec, stage, state)
                source = "peer" if peers else "s3"
        bits = fetch * 8 / self.policy.link_efficiency
        if self.policy.contention_aware:
            ok, end, _ = state.nic.admit(now, bits)
        else:
            ok, end = True, state.nic.finish_times(now, bits)[1] or now
        return ok, fetch, end, source, peers

    def _peers(self, spec: FunctionSpec, stage: StageSpec, state: NodeState) -> list[str]:
        out = []
        for name in sorted(self.cluster.holders.get(spec.model_uri, ())):
            other = self.cluster.nodes[name]
            if other is state or not other.info.loaderd_url:
                continue
            if _resident_bytes(other, spec, stage) >= sum(spec.per_layer_bytes()[stage.layer_start:stage.layer_end]):
                out.append(other.info.loaderd_url)
        return out[:3]

    # ---- fallback and result -----------------------------------------------------------------
    def _fallback(self, feasible: list[Choice], spec: FunctionSpec, pool: list[NodeState],
                  candidates: list[Candidate], now: float) -> Choice | None:
        """No candidate meets the SLOs. ``fastest_p1`` (HydraServe): p = 1 on the best-ranked node.
        ``cheapest_p1`` (ours): the request misses whatever we pick, so take what costs the others
        least: one worker (no partial workers, no consolidation traffic) on the node with the
        fewest bytes to fetch (a cache hit fetches none), then the earliest ready; a split only
        when no node can hold the whole model (serving late beats not serving)."""
        p1 = next((entry for entry in feasible if entry[0].pipeline_size == 1), None)
        if self.policy.fallback == "cheapest_p1":
            if p1 is None:
                return min(feasible, key=lambda f: (f[0].predicted_ttft_s or 0.0, f[0].pipeline_size), default=None)
            return self._cheapest_p1(p1, spec, pool, candidates, now)
        if self.policy.fallback == "least_ttft" and feasible:
            return min(feasible, key=lambda f: (f[0].predicted_ttft_s or 0.0, f[0].pipeline_size))
        return p1  # HydraServe: p = 1 on the node with the most free bandwidth

    def _cheapest_p1(self, p1: Choice, spec: FunctionSpec, pool: list[NodeState], candidates: list[Candidate],
                     now: float) -> Choice:
        cand, splan, sbytes, _, a = p1
        need = memory_gb(spec, 1, True)
        best: Option | None = None
        for offer in self._ranked(spec, splan.stages[0], sbytes[0], pool, now):
            gpu = _best_fit_gpu(offer.state.gpu_free, need)
            if gpu >= 0 and (best is None or (offer.fetch_bytes, offer.ready) < (best.fetch_bytes, best.ready)):
                best = replace(offer, gpu=gpu)
        if best is None:
            return p1
        ttft = best.ready + (spec.prefill_s or 0.0)
        cheap = cand.model_copy(update={"nodes": [best.state.info.name], "predicted_ttft_s": round(ttft, 4),
                                        "reason": "fallback: fewest bytes to fetch, then earliest ready"})
        if cheap.nodes != cand.nodes:
            candidates.append(cheap)
        return cheap, splan, sbytes, [best], a

    def _build(self, request: PlanRequest, chosen: Choice, candidates: list[Candidate], fallback: bool,
               now: float) -> Plan:
        cand, splan, sbytes, opts, a = chosen
        spec = request.function
        p = len(splan.stages)
        plan_id = self.cluster.next_plan_id(spec.name) if not request.dry_run else f"{spec.name}-dry"
        stages = [StagePlacement(
            stage=splan.stages[s], node=o.state.info.name, gpu=o.gpu, memory_gb=memory_gb(spec, p, s < a),
            full=s < a, stage_bytes=sbytes[s], fetch_bytes=o.fetch_bytes, source=o.source, peers=o.peers,
            pooled=o.pooled, loaderd_url=o.state.info.loaderd_url, address=o.state.info.address,
            predicted_fetch_s=round(o.fetch_end - now, 4)) for s, o in enumerate(opts)]
        why = (f"p={p}, {a} full: predicted TTFT {cand.predicted_ttft_s:.2f} s vs SLO {spec.ttft_slo_s:g} s, "
               f"TPOT {cand.predicted_tpot_s:.3f} s vs {spec.tpot_slo_s:g} s on {', '.join(cand.nodes)}")
        if fallback:
            why = f"fallback ({self.policy.fallback}): no candidate met the SLOs; " + why
        else:
            why = "first candidate meeting both SLOs: " + why
        return Plan(plan_id=plan_id, instance_id=request.instance_id or plan_id, function=spec.name,
                    model_uri=spec.model_uri, policy=self.policy.name, pipeline_size=p, full_workers=a,
                    stages=stages, predicted_ttft_s=cand.predicted_ttft_s or 0.0,
                    predicted_tpot_s=cand.predicted_tpot_s or 0.0, meets_slo=cand.meets_slo and not fallback,
                    fallback=fallback, created_at=now, explanation=why, candidates=candidates)


def _best_fit_gpu(free: list[float], need: float) -> int:
    """The device with the least free memory that still fits (keeps big holes for big models)."""
    best, best_free = -1, math.inf
    for i, f in enumerate(free):
        if f + MEM_EPS >= need and f < best_free:
            best, best_free = i, f
    return best


def _resident_bytes(state: NodeState, spec: FunctionSpec, stage: StageSpec) -> int:
    res = state.residency.get(spec.model_uri)
    if res is None:
        return 0
    per_layer = spec.per_layer_bytes()
    held = sum(per_layer[i] for i in range(stage.layer_start, stage.layer_end) if i in res.layers)
    if stage.is_first and res.embeddings:
        held += spec.embed_bytes
    if stage.is_last and res.head:
        held += spec.head_bytes
    if stage.is_first and stage.is_last and res.embeddings and res.head:
        held -= spec.tied_bytes
    return held
