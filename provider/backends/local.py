"""Local backend: carry out a placement plan with worker processes on emulated nodes.

Called by the gateway (it implements hydraserve.activator.ports.FunctionBackend). For a cold
start: ask the placement service for a plan -> tell the chosen node's loaderd to prefetch (the
fetch runs while the worker starts) -> spawn the worker with the plan in its environment ->
wait for readiness -> report to the placement service (which calibrates on the timings).
Each node is emulated by its own loaderd; workers of a node attach to that node's daemon.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import requests

from hydraserve.activator.functions import FunctionConfig
from hydraserve.activator.ports import Endpoint
from hydraserve.contracts.loader import LeaseResponse, PrefetchRequest
from hydraserve.contracts.plan import FunctionSpec, Plan, PlanRequest, WorkerReport, WorkerTimings
from hydraserve.contracts.timeline import Timeline
from hydraserve.errors import HydraError, TemporaryError
from hydraserve.loaderd.client import LoaderClient, LoaderUnavailableError
from hydraserve.provider.backends.process import WorkerProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalNode:
    """One emulated node: its loaderd and its capacity as the planner should see it."""

    name: str
    loaderd_url: str
    loaderd_token: str = field(repr=False)
    gpu_memory_gb: float = 24.0
    nic_gbps: float = 16.0


@dataclass
class _Instance:
    plan: Plan
    worker: WorkerProcess
    node: LocalNode


class PlacementPort(Protocol):
    """What this backend needs from the placement service (its HTTP client fits)."""

    def plan(self, request: PlanRequest) -> Plan: ...

    def report(self, report: WorkerReport) -> object: ...


class LocalBackend:
    def __init__(self, placement: PlacementPort, nodes: list[LocalNode], *,
                 describe_model: Callable[[FunctionConfig], FunctionSpec], run_dir: Path,
                 s3_endpoint_url: str | None = None, worker_env: dict[str, str] | None = None,
                 ready_timeout_s: float = 180.0, prefetch: bool = True) -> None:
        if not nodes:
            raise ValueError("the local backend needs at least one node")
        self._placement = placement
        self._nodes = {n.name: n for n in nodes}
        self._describe_model = describe_model
        self._specs: dict[str, FunctionSpec] = {}
        self._run_dir = run_dir
        self._s3_endpoint_url = s3_endpoint_url
        self._worker_env = worker_env or {}
        self._ready_timeout_s = ready_timeout_s
        # prefetch=False is the baseline the benchmarks compare against (serverless vLLM): no
        # loaderd, the worker fetches from S3 itself once it has started.
        self._prefetch = prefetch
        self._instances: dict[str, _Instance] = {}
        self._lock = threading.Lock()

    # FunctionBackend ---------------------------------------------------------------------
    def start(self, function: FunctionConfig, timeline: Timeline) -> Endpoint:
        spec = self._spec(function)
        # The runtime serves whole models today; pipeline groups come with the pipeline runtime.
        plan = self._placement.plan(PlanRequest(
            function=spec.model_copy(update={"max_pipeline_size": 1, "min_full_workers": 1}),
            instance_id=f"{function.name}-{uuid.uuid4().hex[:8]}"))
        stage = plan.stages[0]
        node = self._nodes.get(stage.node)
        if node is None:
            raise TemporaryError(f"placement chose unknown node {stage.node!r}")
        timeline.mark("plan_decided", component="placement", node=node.name,
                      pipeline_size=plan.pipeline_size, predicted_ttft_s=round(plan.predicted_ttft_s, 2),
                      source=stage.source)
        loader = LoaderClient(node.loaderd_url, node.loaderd_token)
        lease: LeaseResponse | None = None
        watcher: _FetchWatcher | None = None
        try:
            try:
                if not self._prefetch:
                    raise LoaderUnavailableError("prefetch disabled (baseline)")
                lease = loader.prefetch(PrefetchRequest(model_uri=function.model_uri,
                                                        endpoint_url=self._s3_endpoint_url, peers=stage.peers))
            except LoaderUnavailableError as exc:  # the worker will fetch from S3 itself
                log.warning("no prefetch on %s, worker will fetch from S3: %s", node.name, exc.message)
                timeline.mark("prefetch_skipped", component="backend", reason=exc.message)
            else:
                timeline.mark("prefetch_started", component="loaderd", node=node.name,
                              bytes=lease.bytes_total, bytes_new=lease.bytes_new)
                watcher = _FetchWatcher(LoaderClient(node.loaderd_url, node.loaderd_token), lease, timeline)
            worker = self._spawn(function, plan, node)
            timeline.mark("worker_spawned", component="backend", at=worker.spawned_at)
            try:
                worker.wait_ready(self._ready_timeout_s)
            except HydraError:
                worker.stop(grace_s=2)
                raise
            finally:
                if watcher is not None:
                    watcher.stop()
        except HydraError as exc:
            self._report(plan, "failed", reason=exc.message)
            raise
        except Exception as exc:  # e.g. the worker could not be spawned: free the plan's memory too
            self._report(plan, "failed", reason=f"{type(exc).__name__}: {exc}")
            raise TemporaryError(f"cold start failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if lease is not None:  # the worker holds its own lease (tied to its pid)
                _quietly(lambda: loader.release(lease.lease_id))
        self._report(plan, "ready", timings=WorkerTimings(
            fetch_s=watcher.fetch_s if watcher else None, fetch_bytes=lease.bytes_new if lease else None,
            cold_start_s=time.time() - timeline.events[0].at))
        with self._lock:
            self._instances[plan.instance_id] = _Instance(plan, worker, node)
        return Endpoint(url=worker.url, instance_id=plan.instance_id)

    def stop(self, function_name: str, instance_id: str) -> None:
        with self._lock:
            instance = self._instances.pop(instance_id, None)
        if instance is None:
            return
        code = instance.worker.stop()
        log.info("instance stopped", extra={"function": function_name, "instance": instance_id,
                                            "exit_code": code})
        self._report(instance.plan, "released")

    def worker_timeline(self, endpoint: Endpoint) -> Timeline:
        response = requests.get(endpoint.url + "/v1/hydraserve/timeline", timeout=5)
        response.raise_for_status()
        return Timeline.model_validate(response.json())

    def close(self) -> None:
        with self._lock:
            ids = list(self._instances)
        for instance_id in ids:
            self.stop("", instance_id)

    def prepare(self, function: FunctionConfig) -> FunctionSpec:
        """Describe the function's model now (deploy time), not on its first cold start."""
        return self._spec(function)

    # helpers -----------------------------------------------------------------------------
    def _spec(self, function: FunctionConfig) -> FunctionSpec:
        spec = self._specs.get(function.name)
        if spec is None:
            spec = self._describe_model(function)
            self._specs[function.name] = spec
        return spec

    def _spawn(self, function: FunctionConfig, plan: Plan, node: LocalNode) -> WorkerProcess:
        env = {
            **self._worker_env,
            "K_SERVICE": function.name,
            "K_REVISION": f"{function.name}-00001",
            "K_CONFIGURATION": function.name,
            "HYDRASERVE_MODEL_URI": function.model_uri,
            "HYDRASERVE_NODE": node.name,
        }
        if self._prefetch:
            env |= {"HYDRASERVE_LOADERD_URL": node.loaderd_url, "HYDRASERVE_LOADERD_TOKEN": node.loaderd_token}
        if self._s3_endpoint_url:
            env["HYDRASERVE_S3_ENDPOINT_URL"] = self._s3_endpoint_url
        return WorkerProcess(env, self._run_dir / f"{plan.instance_id}.log")

    def _report(self, plan: Plan, event: str, *, reason: str | None = None,
                timings: WorkerTimings | None = None) -> None:
        _quietly(lambda: self._placement.report(WorkerReport(
            plan_id=plan.plan_id, event=event, reason=reason,  # type: ignore[arg-type]
            timings=timings or WorkerTimings())))


class _FetchWatcher:
    """Marks 'weights_fetched' when loaderd holds every byte of the lease (polls its status with
    its own client, ~20 ms resolution)."""

    def __init__(self, loader: LoaderClient, lease: LeaseResponse, timeline: Timeline,
                 poll_s: float = 0.02) -> None:
        self._loader, self._lease, self._timeline, self._poll_s = loader, lease, timeline, poll_s
        self._segments = {s.segment_id for s in lease.segments}
        self._stop = threading.Event()
        self._started = time.time()
        self.fetch_s: float | None = None
        self._thread = threading.Thread(target=self._run, name="fetch-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                segments = [s for s in self._loader.status().segments if s.segment_id in self._segments]
            except HydraError as exc:  # a slow or busy daemon: keep watching
                log.debug("loaderd status failed: %s", exc.message)
                self._stop.wait(self._poll_s)
                continue
            if segments and all(s.state == "complete" for s in segments):
                now = time.time()
                self.fetch_s = now - self._started
                self._timeline.mark("weights_fetched", component="loaderd", at=now,
                                    bytes=sum(s.tensor_bytes for s in segments))
                return
            if any(s.state == "failed" for s in segments):
                return
            self._stop.wait(self._poll_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._loader.close()


def _quietly(call: Callable[[], object]) -> None:
    try:
        call()
    except Exception as exc:  # bookkeeping must not fail a cold start or a stop
        log.warning("bookkeeping call failed: %s", exc)
