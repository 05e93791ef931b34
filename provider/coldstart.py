"""The cold start, backend-neutral: plan -> prefetch on every chosen node -> launch each stage's
worker -> wait until the group is ready -> report -> release the prefetch leases.

Used by every backend that brings functions up (the local process launcher, the Kubernetes pod
launcher) through the ports of hydraserve.provider.worker_port: how a worker comes to exist (a
child process, a pod) is the launcher's business; what happens around it is this module's
(loaderd's prefetch: hydraserve.provider.prefetch). Each
worker learns its part from one typed environment (hydraserve.contracts.worker): function,
model, its stage, the addresses of every stage, full or partial, and its node's loaderd. Every
step is marked on the cold start's timeline; docs/PROTOCOLS.md walks them.

A failure anywhere stops the workers already launched, reports the plan failed (the placement
service frees its memory) and raises the HydraError that says why (InstanceFailedError naming
the nodes whose workers were lost, so the caller can try a plan without them); prefetch leases
are released in every case (a worker holds its own lease once it attached). A group that fails
while serving is failed the same way (``fail``). A group whose head was given
memory for the whole model is watched: once the head says it consolidated, the partial stages'
workers are stopped and the placement service frees their memory; each other full stage's
worker, once it says it serves the whole model on its own, becomes a replica: a group of its
own (one worker, its stage of the plan) that its backend takes (``take_replicas``) and routes
to, stops and fails like any instance. From then on each group reports its own stages.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from hydraserve.auth import mint_worker_token
from hydraserve.contracts.plan import (
    FunctionSpec,
    Plan,
    PlanRequest,
    StagePlacement,
    WorkerReport,
    WorkerTimings,
)
from hydraserve.contracts.stage import MAX_PIPELINE_SIZE
from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.errors import HydraError, InstanceFailedError, TemporaryError
from hydraserve.provider.prefetch import Prefetch, prefetch_pinned, start_prefetches
from hydraserve.provider.worker_port import (
    LaunchedWorker,
    NodeAccess,
    PlacementPort,
    WorkerLauncher,
    WorkerSlot,
)

log = logging.getLogger(__name__)


@dataclass
class Group:
    """A running instance: its plan and its workers, ``workers[i]`` running ``stages[i]`` (index
    0 is the head). Once the head consolidated only it remains, and the plan's other full
    workers wait in ``replicas`` as groups of their own until the backend takes them."""

    plan: Plan
    workers: list[LaunchedWorker] = field(default_factory=list)
    stages: list[StagePlacement] = field(default_factory=list)
    instance_id: str = ""  # the plan's; a replica's names its stage too
    split: bool = False  # the plan's stages belong to several groups now: each reports its own
    replicas: list[Group] = field(default_factory=list)
    stage_timelines: Timeline = field(default_factory=Timeline)  # the inner stages' start-ups, kept
    stopping: threading.Event = field(default_factory=threading.Event)
    consolidated: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.instance_id = self.instance_id or self.plan.instance_id

    @property
    def head(self) -> LaunchedWorker:
        return self.workers[0]


@dataclass
class ColdStartOptions:
    s3_endpoint_url: str | None = None
    prefetch: bool = True  # False: the baseline (serverless vLLM): each worker fetches from S3 itself
    ready_timeout_s: float = 180.0
    pin_s: float = 300.0  # how long a prefetched slice waits for its worker to attach
    watch_s: float = 0.2  # how often a group's head is asked whether it consolidated
    max_pipeline_size: int = MAX_PIPELINE_SIZE  # the planner picks p up to this
    worker: Mapping[str, object] = field(default_factory=dict)  # more WorkerEnvironment fields
    # A worker token in a worker's environment is never renewed: it covers the start-up, when a
    # worker reads its files and attaches (its leases are tied to its pid afterwards). On
    # Kubernetes pods take theirs from the function's worker Secret, which the interceptor renews.
    worker_token_ttl_s: float = 24 * 3600.0


class ColdStart:
    """Carries cold starts out against one placement service, set of nodes and launcher."""

    def __init__(self, placement: PlacementPort, launcher: WorkerLauncher, nodes: Mapping[str, NodeAccess],
                 options: ColdStartOptions | None = None) -> None:
        self._placement = placement
        self._launcher = launcher
        self._nodes = dict(nodes)
        self.options = options or ColdStartOptions()
        self._lock = threading.Lock()  # a group's worker list: consolidation vs scale to zero

    def _plan_on_own_nodes(self, spec: FunctionSpec, exclude_nodes: Sequence[str]) -> Plan:
        """The placement's plan, asked again without any node this backend cannot launch on (a
        node registered by someone else, or one it no longer has: issue 22 item 10, one such node
        failed 11 of 12 cold starts)."""
        exclude = tuple(exclude_nodes)
        for _ in range(len(self._nodes) + 1):
            plan = self._placement.plan(self.plan_request(spec, exclude))
            unknown = [st.node for st in plan.stages if st.node not in self._nodes]
            if not unknown:
                return plan
            self._report(plan, "failed", reason=f"unknown nodes {unknown}")
            log.warning("placement chose node(s) %s this backend has no access to: planning again without them",
                        ", ".join(unknown))
            exclude = (*exclude, *unknown)
        raise TemporaryError(f"placement keeps choosing node(s) this backend has no access to (last: {unknown})")

    def run(self, spec: FunctionSpec, timeline: Timeline, *, revision: str = "",
            exclude_nodes: Sequence[str] = (), on_plan: Callable[[Plan], None] | None = None) -> Group:
        """One cold start of ``spec``'s function, ready when this returns; ``exclude_nodes``:
        nodes the plan must avoid (where an earlier attempt lost a worker); ``on_plan`` hears
        the plan before any worker is reserved (a launcher that names workers after it)."""
        opts = self.options
        plan = self._plan_on_own_nodes(spec, exclude_nodes)
        if on_plan is not None:
            on_plan(plan)
        timeline.mark(Moment.PLAN_DECIDED, component="placement", nodes=plan.nodes, pipeline_size=plan.pipeline_size,
                      predicted_ttft_s=round(plan.predicted_ttft_s, 2), sources=[s.source for s in plan.stages])
        group = Group(plan)
        prefetches: list[Prefetch] = []
        try:
            prefetches = start_prefetches(plan, self._nodes, timeline, opts.s3_endpoint_url, opts.pin_s) \
                if opts.prefetch else []
            if not opts.prefetch:
                timeline.mark(Moment.PREFETCH_SKIPPED, component="backend", reason="prefetch disabled (baseline)")
            slots = [self._launcher.reserve(st.node) for st in plan.stages]
            for st, slot in zip(plan.stages, slots, strict=True):
                env = self._environment(plan, st, slot, [s.transport_address for s in slots], revision)
                worker = self._launcher.launch(st.node, env)
                group.workers.append(worker)
                group.stages.append(st)
                timeline.mark(Moment.WORKER_SPAWNED, component="backend", at=worker.spawned_at, node=st.node,
                              stage=st.stage.index, adopted=worker.adopted)
            ready_at = _wait_all_ready(group.workers, opts.ready_timeout_s, timeline)
            group.stage_timelines = self._inner_timelines(group)
        except Exception as exc:
            reason = exc.message if isinstance(exc, HydraError) else f"{type(exc).__name__}: {exc}"
            lost = self.fail(group, reason)
            if lost:
                timeline.mark(Moment.COLD_START_FAILED, component="backend", lost=list(lost), reason=reason[:200])
                raise InstanceFailedError(f"cold start failed, worker lost on {', '.join(lost)}: {reason}",
                                          nodes=lost, retry_after_s=1.0) from exc
            if isinstance(exc, HydraError):
                raise
            raise TemporaryError(f"cold start failed: {reason}") from exc
        finally:
            for prefetch in prefetches:
                prefetch.finish()
        self._report_ready(plan, group.workers, prefetches, [at - timeline.events[0].at for at in ready_at])
        if plan.pipeline_size > 1 and plan.stages[0].full:
            threading.Thread(target=self._watch_consolidation, args=(group, timeline), name="consolidation-watch",
                             daemon=True).start()
        return group

    def resume(self, group: Group, timeline: Timeline) -> None:
        """Take over a group that serves already (a new leader after a restart) and watch it as
        ``run`` would have: once its head consolidated, its partial stages are stopped."""
        if group.plan.pipeline_size > 1 and group.plan.stages[0].full and len(group.workers) > 1:
            threading.Thread(target=self._watch_consolidation, args=(group, timeline), name="consolidation-watch",
                             daemon=True).start()

    def plan_request(self, spec: FunctionSpec, exclude_nodes: Sequence[str] = (), *,
                     dry_run: bool = False) -> PlanRequest:
        """What a cold start of ``spec`` asks the placement service (within this launcher's limits)."""
        opts = self.options
        function = spec.model_copy(update={
            "max_pipeline_size": min(spec.max_pipeline_size, opts.max_pipeline_size),
            "min_pipeline_size": min(spec.min_pipeline_size, opts.max_pipeline_size)})
        return PlanRequest(function=function, instance_id=f"{spec.name}-{uuid.uuid4().hex[:8]}",
                           exclude_nodes=list(exclude_nodes), dry_run=dry_run)

    def prewarm(self, spec: FunctionSpec, hold_s: float) -> int:
        """Have the nodes a cold start of ``spec`` would use now fetch its stages into their
        loaderd, pinned for ``hold_s`` (no worker, no plan kept: a dry run); the bytes fetched.
        A node whose loaderd does not answer or has no room is skipped."""
        plan = self._placement.plan(self.plan_request(spec, dry_run=True))
        return prefetch_pinned(plan, self._nodes, self.options.s3_endpoint_url, min(hold_s, 86_400.0))

    def stop(self, group: Group) -> None:
        """Scale the group down: every worker drained and stopped (replicas nobody took too),
        its memory freed."""
        group.stopping.set()
        for replica in self.take_replicas(group):
            self.stop(replica)
        self._stop_workers(group)
        self._report_end(group, "released")

    def fail(self, group: Group, reason: str) -> tuple[str, ...]:
        """The group cannot serve: stop what is left of it, report it failed (its memory
        freed) and return the nodes whose workers were lost (a fresh plan should avoid them)."""
        group.stopping.set()
        for replica in self.take_replicas(group):
            self.stop(replica)
        lost = self.lost_nodes(group)
        self._stop_workers(group)
        self._report_end(group, "failed", reason=reason[:2000])
        if lost:
            log.warning("instance %s failed, worker lost on %s: %s", group.instance_id, ", ".join(lost), reason)
        return lost

    def take_replicas(self, group: Group) -> list[Group]:
        """The replicas ``group`` became since last asked (each now the caller's to stop)."""
        with self._lock:
            taken, group.replicas = group.replicas, []
        return taken

    def lost_nodes(self, group: Group) -> tuple[str, ...]:
        """Nodes of the group's workers that are gone without having been stopped (cheap)."""
        with self._lock:
            pairs = list(zip(group.stages, group.workers, strict=True))
        return tuple(dict.fromkeys(st.node for st, worker in pairs if worker.lost()))

    def _watch_consolidation(self, group: Group, timeline: Timeline) -> None:
        """Once the head says it consolidated: stop the partial stages' workers and free their
        memory in the placement service (released per stage, then consolidated); then wait for
        each other full stage to become a replica."""
        while not group.stopping.wait(self.options.watch_s):
            try:
                consolidated = group.head.status().consolidated
            except HydraError:
                continue  # a slow or restarting head: ask again
            if not consolidated:
                continue
            with self._lock:
                if group.stopping.is_set():
                    return
                others = list(zip(group.stages[1:], group.workers[1:], strict=True))
                group.stages, group.workers, group.split = group.stages[:1], group.workers[:1], True
            becoming = [(st, worker) for st, worker in others if st.full]
            retired = [(st, worker) for st, worker in others if not st.full]
            for st, worker in retired:
                self._retire(group.plan, st, worker)
            self._report(group.plan, "consolidated")
            timeline.mark(Moment.GROUP_CONSOLIDATED, component="backend", stopped=[st.node for st, _ in retired],
                          replicas=[st.node for st, _ in becoming])
            group.consolidated.set()
            for st, worker in becoming:
                self._await_replica(group, st, worker, timeline)
            return

    def _await_replica(self, group: Group, st: StagePlacement, worker: LaunchedWorker, timeline: Timeline) -> None:
        """Offer a full inner stage's worker as a replica once it says it serves the whole model;
        one that fails, is lost, outlives its group or takes longer than ready_timeout_s is
        stopped and its memory freed."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        reason = ""
        while not reason:
            if group.stopping.wait(self.options.watch_s):
                reason = "its group stopped"
            elif worker.lost():
                reason = "worker lost"
            elif time.monotonic() > deadline:
                reason = f"not serving on its own within {self.options.ready_timeout_s:.0f} s"
            else:
                try:
                    status = worker.status()
                except HydraError:
                    continue  # slow or busy: ask again
                if status.status in ("failed", "draining"):
                    reason = status.reason or status.status
                elif status.consolidated:
                    replica = Group(group.plan, [worker], [st], instance_id=f"{group.instance_id}-s{st.stage.index}",
                                    split=True)
                    with self._lock:
                        if not group.stopping.is_set():
                            group.replicas.append(replica)
                            timeline.mark(Moment.REPLICA_READY, component="backend", node=st.node,
                                          instance=replica.instance_id)
                            return
        self._retire(group.plan, st, worker)
        timeline.mark(Moment.REPLICA_FAILED, component="backend", node=st.node, reason=reason[:200])
        log.warning("stage %d of %s did not become a replica: %s", st.stage.index, group.instance_id, reason)

    def _retire(self, plan: Plan, st: StagePlacement, worker: LaunchedWorker) -> None:
        """Stop one stage's worker and free its memory."""
        _quietly(functools.partial(worker.stop, grace_s=2))
        self._report(plan, "released", stage=st.stage.index)

    def _report_end(self, group: Group, event: str, reason: str | None = None) -> None:
        """The group is over: its plan (or, once split, each of its own stages) released or failed."""
        if group.split:
            for st in group.stages:
                self._report(group.plan, event, reason=reason, stage=st.stage.index)
        else:
            self._report(group.plan, event, reason=reason)

    # steps -------------------------------------------------------------------------------
    def _environment(self, plan: Plan, st: StagePlacement, slot: WorkerSlot, peers: list[str],
                     revision: str) -> WorkerEnvironment:
        """One stage's environment."""
        node = self._nodes[st.node]
        values: dict[str, object] = {
            "host": slot.host, "port": slot.port, "transport_port": slot.transport_port, "function": plan.function, "revision": revision or f"{plan.function}-00001",
            "configuration": plan.function, "instance_id": plan.instance_id, "model_uri": plan.model_uri,
            "s3_endpoint_url": self.options.s3_endpoint_url,
            "stage": st.stage if plan.pipeline_size > 1 else None, "full": st.full, "peers": peers,
            "group_layers": [s.stage.layer_end - s.stage.layer_start for s in plan.stages] if plan.pipeline_size > 1 else [],
            "spawned_at": time.time(), **self.options.worker,
        }
        if self.options.prefetch and node.loaderd_url:  # the worker's own token: its model, its leases, not the node's
            token = mint_worker_token({node.name: node.loaderd_token}, subject=f"{plan.instance_id}/{st.stage.index}",
                                      model_uri=plan.model_uri, expires_at=time.time() + self.options.worker_token_ttl_s)
            values |= {"loaderd_url": node.loaderd_url, "loaderd_token": token}
        return WorkerEnvironment.model_validate(values)

    @staticmethod
    def _inner_timelines(group: Group) -> Timeline:
        """The inner stages' start-up timelines, each event labelled with its stage (kept: those
        workers go away when the head consolidates)."""
        merged = Timeline()
        for index, worker in enumerate(group.workers[1:], start=1):
            try:
                own = worker.timeline()
            except HydraError as exc:
                log.warning("no timeline from stage %d: %s", index, exc.message)
                continue
            merged.absorb(own, f"stage{index}")
        return merged

    def _stop_workers(self, group: Group) -> None:
        with self._lock:
            workers = list(group.workers)
        for worker in reversed(workers):
            _quietly(functools.partial(worker.stop, grace_s=2))

    def _report_ready(self, plan: Plan, workers: Sequence[LaunchedWorker], prefetches: list[Prefetch],
                      cold_start_s: list[float]) -> None:
        """One report per stage, as the simulator sends them: its node's own fetch (a group's
        nodes fetch their own bytes in parallel: each calibrates its own bandwidth) and its
        worker's own plan-to-ready time (its node's start-up). A stage loaderd did not prefetch
        is no sample: its worker fetched its own weights, which the start-up model does not
        describe."""
        prefetched = {p.stage: p for p in prefetches}
        for st, worker, seconds in zip(plan.stages, workers, cold_start_s, strict=True):
            prefetch = prefetched.get(st.stage.index)
            timings = (WorkerTimings(fetch_s=prefetch.fetch_s, fetch_bytes=prefetch.lease.bytes_new, cold_start_s=seconds,
                                     adopted=worker.adopted)
                       if prefetch is not None else WorkerTimings(sample=False))
            self._report(plan, "ready", stage=st.stage.index, timings=timings)

    def _report(self, plan: Plan, event: str, *, reason: str | None = None, stage: int | None = None,
                timings: WorkerTimings | None = None) -> None:
        _quietly(lambda: self._placement.report(WorkerReport(
            plan_id=plan.plan_id, event=event, reason=reason, stage=stage,  # type: ignore[arg-type]
            timings=timings or WorkerTimings())))


def _wait_all_ready(workers: Sequence[LaunchedWorker], timeout_s: float, timeline: Timeline) -> list[float]:
    """Wait for every worker at once and return when each was ready (unix time): the first to
    fail ends the wait with its error (a stage lost early must not wait behind a head that
    keeps trying to link to it). How many are ready is the timeline's progress meanwhile."""
    ready_now: list[LaunchedWorker] = []
    timeline.progress(workers_ready=0, workers=len(workers))

    def ready(worker: LaunchedWorker) -> float:
        worker.wait_ready(timeout_s)
        ready_now.append(worker)
        timeline.progress(workers_ready=len(ready_now))
        return time.time()

    if len(workers) == 1:
        return [ready(workers[0])]
    pool = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="wait-ready")
    try:
        futures = [pool.submit(ready, worker) for worker in workers]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            future.result()  # raises the first failure
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception as exc:  # bookkeeping must not fail a cold start or a stop
        log.warning("bookkeeping call failed: %s", exc)
