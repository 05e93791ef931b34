"""Local backend: functions as worker processes on emulated nodes (the embedded default).

Implements hydraserve.contracts.backend.FunctionBackend for the gateway by composing the
backend-neutral cold start (hydraserve.provider.coldstart) with the process launcher; it keeps
the running instances and each function's model description. Each node is emulated by its own
loaderd; workers of a node attach to that node's daemon.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydraserve.contracts.backend import Endpoint, WorkerLog
from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.plan import FunctionSpec, Plan, StagePlacement
from hydraserve.contracts.timeline import Timeline
from hydraserve.errors import TemporaryError
from hydraserve.provider.coldstart import ColdStart, ColdStartOptions, Group
from hydraserve.provider.embedded.process import NodeHost, ProcessLauncher
from hydraserve.provider.model_spec import describe_model
from hydraserve.provider.worker_port import PlacementPort
from hydraserve.runtime.embedded.forkserver_client import ForkServerClient
from hydraserve.weights.model_files import StoredModelFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalNode:
    """One emulated node: its loaderd, where its workers run, and its capacity as the planner
    should see it."""

    name: str
    loaderd_url: str
    loaderd_token: str = field(repr=False)
    gpu_memory_gb: float = 24.0
    nic_gbps: float = 16.0
    host: NodeHost = field(default_factory=NodeHost)


class LocalBackend:
    def __init__(self, placement: PlacementPort, nodes: list[LocalNode], *,
                 open_model: Callable[[str], StoredModelFiles], run_dir: Path,
                 s3_endpoint_url: str | None = None, worker_env: dict[str, str] | None = None,
                 ready_timeout_s: float = 180.0, prefetch: bool = True,
                 worker_settings: Mapping[str, object] | None = None,
                 pools: Mapping[str, ForkServerClient] | None = None) -> None:
        if not nodes:
            raise ValueError("the local backend needs at least one node")
        self._open_model = open_model
        self._specs: dict[str, tuple[FunctionSpec, str]] = {}  # config -> its spec, and its model's fingerprint
        # prefetch=False: the baselines the benchmarks compare against (no loaderd: the worker
        # fetches from S3 itself once it has started; worker_settings s3_fetch="download": whole
        # files first, as serverless vLLM does).
        self.launcher = ProcessLauncher(run_dir, extra_env=worker_env, hosts={n.name: n.host for n in nodes},
                                        pools=pools)
        self.coldstart = ColdStart(placement, self.launcher,
                                   {n.name: n for n in nodes},
                                   ColdStartOptions(s3_endpoint_url=s3_endpoint_url, prefetch=prefetch,
                                                    ready_timeout_s=ready_timeout_s, worker=dict(worker_settings or {})))
        self._groups: dict[str, Group] = {}
        self._failed_starts: dict[str, Plan] = {}  # function -> the plan of its last failed cold start
        self.can_prewarm = prefetch  # the baseline's workers fetch from S3 themselves: loaderd bytes would go unused
        self._closed = False
        self._lock = threading.Lock()

    # FunctionBackend ---------------------------------------------------------------------
    def start(self, function: FunctionConfig, timeline: Timeline, exclude_nodes: Sequence[str] = ()) -> Endpoint:
        plans: list[Plan] = []
        try:
            group = self.coldstart.run(self.prepare(function), timeline, exclude_nodes=exclude_nodes,
                                       on_plan=plans.append)
        except Exception:
            if plans:  # its workers are gone; their logs say why (worker_logs)
                with self._lock:
                    self._failed_starts[function.name] = plans[-1]
            raise
        with self._lock:
            closed = self._closed
            if not closed:
                self._groups[group.instance_id] = group
        if closed:  # finished after close(): nobody will ever stop it but us
            self.coldstart.stop(group)
            raise TemporaryError("the backend closed while this instance started")
        return Endpoint(url=group.head.url, instance_id=group.instance_id)

    def stop(self, function_name: str, instance_id: str) -> None:
        with self._lock:
            group = self._groups.pop(instance_id, None)
        if group is None:
            return
        self.coldstart.stop(group)
        log.info("instance stopped", extra={"function": function_name, "instance": instance_id})

    def fail(self, function_name: str, instance_id: str, reason: str) -> tuple[str, ...]:
        with self._lock:
            group = self._groups.pop(instance_id, None)
        if group is None:
            return ()
        lost = self.coldstart.fail(group, reason)
        log.warning("instance failed", extra={"function": function_name, "instance": instance_id,
                                              "lost_nodes": list(lost), "reason": reason})
        return lost

    def prewarm(self, function: FunctionConfig, hold_s: float) -> int:
        return self.coldstart.prewarm(self.prepare(function), hold_s)

    def take_replicas(self, instance_id: str) -> list[Endpoint]:
        with self._lock:
            group = self._groups.get(instance_id)
            replicas = [] if group is None or self._closed else self.coldstart.take_replicas(group)
            for replica in replicas:
                self._groups[replica.instance_id] = replica
        return [Endpoint(url=r.head.url, instance_id=r.instance_id) for r in replicas]

    def lost_nodes(self, instance_id: str) -> tuple[str, ...]:
        with self._lock:
            group = self._groups.get(instance_id)
        return () if group is None else self.coldstart.lost_nodes(group)

    def instance_memory_gb(self, instance_id: str) -> float:
        group = self.group(instance_id)
        return sum(st.memory_gb for st in group.stages) if group is not None else 0.0

    def group(self, instance_id: str) -> Group | None:
        """The running group of an instance (its plan, workers and consolidation state)."""
        with self._lock:
            return self._groups.get(instance_id)

    def worker_timeline(self, endpoint: Endpoint) -> Timeline:
        """The head's timeline (consolidation included), merged with its group's inner stages'."""
        with self._lock:
            group = self._groups.get(endpoint.instance_id)
        if group is None:
            raise TemporaryError(f"no running instance {endpoint.instance_id}")
        return group.head.timeline().merged(group.stage_timelines)

    def worker_logs(self, function_name: str, tail: int) -> list[WorkerLog]:
        """Each running instance's workers, then its last failed cold start's (those that wrote a log)."""
        with self._lock:
            starts = [(g.instance_id, g.plan, list(g.stages), False) for g in self._groups.values()
                      if g.plan.function == function_name]
            failed = self._failed_starts.get(function_name)
        if failed is not None:
            starts.append((failed.instance_id, failed, failed.stages, True))
        return [entry for instance, plan, stages, failed_start in starts for st in stages
                if (entry := self._worker_log(instance, plan, st, tail, failed_start)) is not None]

    def _worker_log(self, instance: str, plan: Plan, st: StagePlacement, tail: int,
                    failed_start: bool) -> WorkerLog | None:
        text = self.launcher.read_log(plan.instance_id, st.stage.index, tail)  # a replica's worker is its plan's
        return None if text is None else WorkerLog(instance, st.stage.index, st.node, text, failed_start)

    def close(self) -> None:
        """Stop every instance, and every worker of a cold start still under way (a start that
        finishes later stops its own group)."""
        with self._lock:
            self._closed = True
            ids = list(self._groups)
        for instance_id in ids:
            self.stop("", instance_id)
        for worker in self.launcher.running():
            log.warning("stopping worker %s of a cold start still under way", worker.label)
            worker.stop(grace_s=5)

    def prepare(self, function: FunctionConfig) -> FunctionSpec:
        """The function's model description, read once per deployed config (at deploy time, not
        on a cold start; a function created again with other settings is read again)."""
        key = function.model_dump_json()
        known = self._specs.get(key)
        if known is None:
            files = self._open_model(function.model_uri)
            known = self._specs[key] = (describe_model(function, files), files.fingerprint())
        return known[0]

    def model_fingerprint(self, function: FunctionConfig) -> str:
        """Asked of the store now; a model pushed again since it was read is read again at the
        next cold start."""
        fingerprint = self._open_model(function.model_uri).fingerprint(fresh=True)
        key = function.model_dump_json()
        known = self._specs.get(key)
        if known is not None and known[1] != fingerprint:
            self._specs.pop(key, None)
        return fingerprint
