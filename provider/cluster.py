"""The cluster as the planner sees it: nodes, GPU memory, NIC fetches, loaderd residency, plans.

Written by the service (node registrations, plans it hands out, worker reports) and by the
simulator (the same calls in simulated time); read by the planner. Not thread-safe on its own:
the service serialises calls with one lock, which is what keeps concurrent cold starts from
being planned against the same free memory or bandwidth. Per-node numbers the planner scans
on every decision are mirrored in numpy arrays so a 1000-node scan is a few vector ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hydraserve.contracts.plan import NodeInfo, Plan, Residency
from hydraserve.errors import ConflictError
from hydraserve.provider.calibration import Calibration
from hydraserve.provider.network import Nic

MEM_EPS = 1e-6


@dataclass
class ResidentModel:
    """Which parts of one model a node's loaderd holds."""

    layers: set[int] = field(default_factory=set)
    embeddings: bool = False
    head: bool = False


@dataclass
class NodeState:
    info: NodeInfo
    row: int
    gpu_free: list[float]
    nic: Nic
    residency: dict[str, ResidentModel] = field(default_factory=dict)
    workers: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)  # (plan, stage) -> (gpu, gb)


@dataclass
class ActivePlan:
    plan: Plan
    created_at: float
    ready: set[int] = field(default_factory=set)
    fetch_s: dict[int, float] = field(default_factory=dict)  # stage -> seconds its fetch took
    consolidating: bool = False  # the full workers' complement fetches are modelled


class ClusterState:
    """Mutable cluster model; every mutation takes ``now`` so the NIC model stays exact."""

    def __init__(self, calibration: Calibration | None = None) -> None:
        self.calibration = calibration or Calibration()
        self.nodes: dict[str, NodeState] = {}
        self.order: list[str] = []
        self.plans: dict[str, ActivePlan] = {}
        self.holders: dict[str, set[str]] = {}  # model_uri -> nodes holding any of it
        self._cap = 0
        self.max_free = np.zeros(0)  # largest free device memory per row (GB)
        self.configured_bps = np.zeros(0)
        self.bps = np.zeros(0)  # believed NIC bandwidth (calibrated when enabled)
        self.nfetch = np.zeros(0)
        self.schedulable = np.zeros(0, dtype=bool)
        self.plan_counter = 0

    # ---- nodes -------------------------------------------------------------------------------
    def upsert_node(self, info: NodeInfo, now: float) -> NodeState:
        """Register a node or replace its record, keeping the allocations we made on it; its
        warm pool's memory comes out of device 0 (ConflictError, nothing changed, when a new
        node's pool, or a pool that grew, finds no room beside the allocations)."""
        old = self.nodes.get(info.name)
        used = [0.0] * info.gpus
        for gpu, gb in (old.workers.values() if old else ()):
            if gpu < info.gpus:
                used[gpu] += gb
        if info.gpus:
            used[0] += info.pool_memory_gb
        grew = old is None or info.pool_memory_gb > old.info.pool_memory_gb
        if info.gpu_free_gb is None and info.gpus and grew and used[0] > info.gpu_memory_gb + MEM_EPS:
            raise ConflictError(f"node {info.name}: its warm pool needs {info.pool_memory_gb} GB of device 0, "
                                f"{max(0.0, info.gpu_memory_gb - used[0] + info.pool_memory_gb):.1f} GB are free")
        gpu_free = (list(info.gpu_free_gb) if info.gpu_free_gb is not None  # the node's own view counts its pool
                    else [max(0.0, info.gpu_memory_gb - u) for u in used])
        if old is None:
            row = len(self.order)
            self._grow(row + 1)
            self.order.append(info.name)
            state = NodeState(info=info, row=row, gpu_free=gpu_free, nic=Nic(info.nic_gbps * 1e9, now))
            self.nodes[info.name] = state
        else:
            state = old
            state.gpu_free = gpu_free
            state.info = info
            state.nic.advance(now)
            state.nic.bps = info.nic_gbps * 1e9
        if info.residency is not None or old is None:
            self._set_residency(state, info.residency or [])
        self.sync(state)
        return state

    def remove_node(self, name: str) -> None:
        """Forget a node (KeyError when unknown; ConflictError, nothing changed, while an active
        plan has a stage there). The last row moves into its place, so the planner's arrays stay
        dense."""
        state = self.nodes[name]
        holding = sorted(pid for pid, active in self.plans.items() if name in active.plan.nodes)
        if holding:
            raise ConflictError(f"node {name} runs stages of active plan(s) {', '.join(holding)}: remove it once "
                                "they are released")
        for uri in state.residency:
            self.holders.get(uri, set()).discard(name)
        last = self.nodes[self.order[-1]]
        if last is not state:
            self.order[state.row] = last.info.name
            last.row = state.row
            self.sync(last)
        self.order.pop()
        del self.nodes[name]

    def _set_residency(self, state: NodeState, residency: list[Residency]) -> None:
        for uri in list(state.residency):
            self.holders.get(uri, set()).discard(state.info.name)
        state.residency = {}
        for r in residency:
            state.residency[r.model_uri] = ResidentModel(set(r.layers), r.embeddings, r.head)
            self.holders.setdefault(r.model_uri, set()).add(state.info.name)

    def add_residency(self, node: str, model_uri: str, layers: range, embeddings: bool, head: bool) -> None:
        state = self.nodes[node]
        res = state.residency.setdefault(model_uri, ResidentModel())
        res.layers.update(layers)
        res.embeddings |= embeddings
        res.head |= head
        self.holders.setdefault(model_uri, set()).add(node)

    def drop_residency(self, node: str, model_uri: str) -> None:
        self.nodes[node].residency.pop(model_uri, None)
        self.holders.get(model_uri, set()).discard(node)

    def _grow(self, n: int) -> None:
        if n <= self._cap:
            return
        cap = max(16, self._cap * 2, n)
        for name in ("max_free", "configured_bps", "bps", "nfetch"):
            arr = np.zeros(cap)
            arr[: self._cap] = getattr(self, name)[: self._cap]
            setattr(self, name, arr)
        sched = np.zeros(cap, dtype=bool)
        sched[: self._cap] = self.schedulable[: self._cap]
        self.schedulable = sched
        self._cap = cap

    def sync(self, state: NodeState) -> None:
        """Mirror one node's numbers into the arrays the planner scans."""
        r = state.row
        self.max_free[r] = max(state.gpu_free, default=0.0)
        self.configured_bps[r] = state.info.nic_gbps * 1e9
        self.bps[r] = self.bandwidth_bps(state)
        self.nfetch[r] = len(state.nic)
        self.schedulable[r] = state.info.schedulable

    def pool_idle(self, state: NodeState) -> int:
        """Idle runtimes the node's warm pool should have now: its size less the workers placed
        there that are not ready yet (each adopted one; the pool refills within milliseconds)."""
        if not state.info.pool_size:
            return 0
        starting = sum(1 for plan_id, stage in state.workers
                       if (active := self.plans.get(plan_id)) is not None and stage not in active.ready)
        return max(0, state.info.pool_size - starting)

    @property
    def size(self) -> int:
        return len(self.order)

    def bandwidth_bps(self, state: NodeState) -> float:
        """The planner's belief about the NIC: calibrated if enabled, else configured."""
        return self.calibration.bandwidth_bps(state.info.name, state.info.nic_gbps * 1e9)

    # ---- memory and fetches --------------------------------------------------------------------
    def allocate(self, node: str, gpu: int, gb: float, key: tuple[str, int]) -> None:
        state = self.nodes[node]
        if state.gpu_free[gpu] + MEM_EPS < gb:
            raise ValueError(f"{node} gpu {gpu}: {gb} GB asked, {state.gpu_free[gpu]:.2f} GB free")
        state.gpu_free[gpu] -= gb
        state.workers[key] = (gpu, gb)
        self.sync(state)

    def free(self, node: str, key: tuple[str, int]) -> float:
        state = self.nodes.get(node)
        if state is None or key not in state.workers:
            return 0.0
        gpu, gb = state.workers.pop(key)
        ceiling = state.info.gpu_memory_gb - (state.info.pool_memory_gb if gpu == 0 else 0.0)
        state.gpu_free[gpu] = min(ceiling, state.gpu_free[gpu] + gb)
        self.sync(state)
        return gb

    def add_fetch(self, node: str, key: str, bits: float, deadline: float, now: float,
                  background: bool = False) -> None:
        state = self.nodes[node]
        state.nic.bps = self.bandwidth_bps(state)
        state.nic.add(key, bits, deadline, now, background=background)
        self.sync(state)

    def end_fetch(self, node: str, key: str, now: float) -> float:
        """Drop a fetch (its worker reported); returns its mean NIC sharing for calibration."""
        state = self.nodes.get(node)
        if state is None:
            return 1.0
        fetch = state.nic.remove(key, now)
        self.sync(state)
        return fetch.mean_sharing(now) if fetch else 1.0

    def refresh_nic(self, state: NodeState, now: float) -> None:
        """Bring the modelled NIC up to ``now`` at the current bandwidth belief."""
        state.nic.advance(now)
        state.nic.bps = self.bandwidth_bps(state)
        state.nic.finished.clear()
        self.nfetch[state.row] = len(state.nic)

    def next_plan_id(self, function: str) -> str:
        self.plan_counter += 1
        return f"{function}-{self.plan_counter}"

    def gpu_memory_used(self) -> float:
        return sum(gb for s in self.nodes.values() for _, gb in s.workers.values())
