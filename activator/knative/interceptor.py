"""The interceptor: the scheduler of function pods, where a Knative scale from zero becomes a
HydraServe cold start.

A function revision's pods name our scheduler (provider/knative/service.py), so a new pending
pod of one is the scale-from-zero event. For each, in a thread of its own: the function's model
and SLOs are read from the pod's annotations, the real cluster is told to the placement service
(activator/knative/nodes.py), and the backend-neutral cold start runs with the pod launcher
(activator/knative/pods.py): plan, prefetch on every chosen node's loaderd, bind the pod to
stage 0's node with its role, create the helper stage pods, wait until the group serves, report.
Once the head consolidates the helpers are deleted; when Knative deletes the function pod (scale
to zero) its group is stopped and its memory released (the helpers would be collected anyway:
they are owned by it).

What it survives, and how:
- its own restart: nothing is kept but the API's objects. A pod bound before the restart is
  left to run (its memory is counted from its annotations); one still pending is started anew;
- conflicts: a binding answered 409 means the pod is bound already (by an earlier attempt or
  an earlier incarnation): that cold start ends; objects that exist already are kept;
- pod deletion mid cold start: the cold start fails, its helpers are deleted, its memory freed;
- node loss (deleted, NotReady or cordoned): the groups with a worker there are failed and their
  function pods deleted, so Knative makes new ones, which are planned on other nodes;
- a loaderd that does not answer: the cold start skips its prefetch; the worker fetches from S3.
A cold start that fails before binding is retried while the pod is pending (exponential back-off
up to ``retry_max_s``, never sooner than the error's own Retry-After); one that fails after
binding deletes its function pod (a bound pod cannot move). A pod that cannot be started at all
(no model, a bad SLO, a model its namespace may not use, a mount of more of loaderd's directory
than its model's: activator/knative/admission.py) gets one Warning Event and is not looked at again until it is deleted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import watch
from kubernetes.client import ApiException, CoreV1Api, NetworkingV1Api
from pydantic import ValidationError

from hydraserve.activator.knative.admission import ModelAllowlist, admission_problem, function_of
from hydraserve.activator.knative.metrics import InterceptorMetrics
from hydraserve.activator.knative.nodes import ClusterFeed, KubeNode, Placed, StageKey
from hydraserve.activator.knative.pods import (
    WORKER_TOKEN_TTL_S,
    ForeignSecretError,
    PodLauncher,
    ensure_worker_secret,
    instance_key,
    plan_of_pod,
)
from hydraserve.activator.knative.policy import ensure_network_policy
from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.plan import FunctionSpec, Plan
from hydraserve.contracts.pod import INSTANCE_LABEL, STAGE_LABEL, TIMELINE_ANNOTATION
from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.errors import ConflictError, HydraError, InstanceFailedError
from hydraserve.provider.coldstart import ColdStart, ColdStartOptions, Group
from hydraserve.provider.knative.kube import delete_quietly, pod_event
from hydraserve.provider.knative.service import (
    SCHEDULER_NAME,
)
from hydraserve.provider.worker_port import PlacementPort

log = logging.getLogger(__name__)

REVISION_LABEL = "serving.knative.dev/revision"
FUNCTION_PODS = f"spec.schedulerName={SCHEDULER_NAME}"  # the field selector of the pods we schedule


@dataclass
class InterceptorOptions:
    coldstart: ColdStartOptions = field(default_factory=ColdStartOptions)
    retry_s: float = 2.0  # the first back-off while the pod is pending; it doubles with each failure
    retry_max_s: float = 60.0  # ... up to this
    resync_s: float = 30.0  # how often the whole cluster is read again (and the watch restarted from a list)
    watch_window_s: float = 5.0  # one watch request's length: a stop (a lost Lease) is seen within it
    control_namespace: str = "hydraserve-system"  # the control plane's (its function NetworkPolicies admit it)
    namespaces: frozenset[str] | None = None  # the function namespaces it serves (None: all); its RBAC is bound there
    model_allowlist: ModelAllowlist | None = None  # the models each namespace may use (None: any)
    worker_token_ttl_s: float = WORKER_TOKEN_TTL_S  # a worker Secret's token lives this long, renewed at half


@dataclass
class _Start:
    """One function pod we are bringing up or serving."""

    pod: dict[str, Any]
    function: FunctionConfig | None = None
    launcher: PodLauncher | None = None
    coldstart: ColdStart | None = None
    group: Group | None = None
    deleted: threading.Event = field(default_factory=threading.Event)
    failing: threading.Event = field(default_factory=threading.Event)  # its group is being failed (once)


class Interceptor:
    """Watches function pods and carries out their cold starts."""

    def __init__(self, core: CoreV1Api, placement: PlacementPort, feed: ClusterFeed,
                 describe: Callable[[FunctionConfig], FunctionSpec], options: InterceptorOptions | None = None,
                 metrics: InterceptorMetrics | None = None) -> None:
        self._core, self._placement, self._feed, self._describe = core, placement, feed, describe
        self.options = options or InterceptorOptions()
        self.metrics = metrics or InterceptorMetrics()
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._secret_lock = threading.Lock()  # worker Secrets: read, then replaced at their resourceVersion
        self._starts: dict[str, _Start] = {}  # function pod uid ->
        self._skipped: set[str] = set()  # uids of pods not to act on: invalid ones (told once), other namespaces
        self._specs: dict[str, FunctionSpec] = {}
        self._nodes: dict[str, KubeNode] = {}
        self._stop = threading.Event()
        self.threads: list[threading.Thread] = []

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        """List, then watch, until ``stop``; a watch that expires (410) or breaks lists again."""
        stop = self._stop
        while not stop.is_set():
            try:
                version = self.resync()
                self._watch(version, stop)
            except ApiException as exc:
                log.warning("pod watch ended (%s %s): listing again", exc.status, exc.reason)
                stop.wait(1.0)
            except HydraError as exc:
                log.warning("cluster read failed (%s): trying again", exc.message)
                stop.wait(1.0)
            except Exception:  # a broken connection mid-watch, a body we could not read: never stop scheduling
                log.exception("pod watch failed: listing again")
                stop.wait(1.0)

    def stop(self) -> None:
        """Stop watching. A cold start under way is abandoned (its pods deleted, its memory
        freed): Knative makes a new pod, which the next leader starts; groups that serve are
        left to serve (the next leader takes them over from their pods): only our watching of
        them ends."""
        self._stop.set()
        with self._lock:
            for start in self._starts.values():
                if start.group is not None:
                    start.group.stopping.set()

    def resync(self) -> str:
        """Read every function pod (and the nodes) and act on each; the list's resourceVersion."""
        self.refresh_nodes()
        pods = self._core.list_pod_for_all_namespaces(field_selector=FUNCTION_PODS)
        sanitize = self._core.api_client.sanitize_for_serialization
        listed = [sanitize(pod) for pod in pods.items]
        for pod in listed:
            self.observe("ADDED", pod)
        present = {pod["metadata"]["uid"] for pod in listed}
        with self._lock:
            missed = [s.pod for uid, s in self._starts.items() if uid not in present]
            self._skipped &= present  # deleted while no watch ran
        for pod in missed:  # deleted while no watch ran (a resync, a 410): as if the watch had said so
            self.observe("DELETED", pod)
        self._renew_worker_secrets()
        return str(pods.metadata.resource_version or "")

    def _watch(self, version: str, stop: threading.Event) -> None:
        """Watch from ``version`` in short windows (so a stop is seen within ``watch_window_s``)
        until the next resync is due."""
        sanitize = self._core.api_client.sanitize_for_serialization
        resync_at = time.monotonic() + self.options.resync_s
        while not stop.is_set() and time.monotonic() < resync_at:
            window = max(1, round(min(self.options.watch_window_s, resync_at - time.monotonic())))
            for event in watch.Watch().stream(self._core.list_pod_for_all_namespaces, resource_version=version,
                                              field_selector=FUNCTION_PODS,
                                              timeout_seconds=window, _request_timeout=window + 10):
                if event["type"] == "ERROR":
                    raise ApiException(status=(event.get("raw_object") or {}).get("code", 410), reason="watch error")
                pod = sanitize(event["object"])
                version = pod["metadata"].get("resourceVersion") or version
                self.observe(event["type"], pod)

    def refresh_nodes(self) -> dict[str, KubeNode]:
        """Tell the planner the real cluster; fail the groups on nodes that went away."""
        with self._refresh_lock:  # concurrent refreshes would overwrite each other's view
            nodes = self._feed.refresh(self._under_way())
        with self._lock:
            self._nodes = nodes
            starts = list(self._starts.values())
        for start in starts:
            lost = [w for w in (start.launcher.workers if start.launcher else [])
                    if w.node not in nodes or not nodes[w.node].ready]
            for worker in lost:
                worker.mark_lost(f"node {worker.node} is gone or not ready")
            if lost and start.group is not None:
                self._spawn(self._fail, start, f"node {lost[0].node} lost")
        return nodes

    def _under_way(self) -> dict[StageKey, Placed]:
        with self._lock:
            plans = [s.launcher.plan for s in self._starts.values()  # a serving group's pods say it
                     if s.launcher and s.launcher.plan and s.group is None]
        return {(instance_key(plan.instance_id), str(st.stage.index)): Placed(st.node, st.gpu, st.memory_gb)
                for plan in plans for st in plan.stages}

    # ---- events ----------------------------------------------------------------------------------
    def observe(self, kind: str, pod: dict[str, Any]) -> None:
        if self._stop.is_set():  # no longer leading: another replica may be scheduling by now
            return
        meta, spec = pod["metadata"], pod.get("spec") or {}
        labels = meta.get("labels") or {}
        uid = meta["uid"]
        if self._skip(kind, pod):
            return
        if labels.get(STAGE_LABEL, "0") != "0" and INSTANCE_LABEL in labels:
            self._helper_event(kind, pod)
            return
        gone = kind == "DELETED" or bool(meta.get("deletionTimestamp"))
        with self._lock:
            start = self._starts.get(uid)
            new = start is None and not gone and (not spec.get("nodeName") or plan_of_pod(pod) is not None)
            if new:
                start = self._starts[uid] = _Start(pod=pod)
        if new:  # a new pod, or one an earlier leader bound (its group is taken over)
            assert start is not None
            self._spawn(self._cold_start if not spec.get("nodeName") else self._adopt, start)
            return
        if gone and start is not None and not start.deleted.is_set():
            start.deleted.set()
            for worker in start.launcher.workers[:1] if start.launcher else []:
                worker.mark_lost("function pod deleted")
            if start.group is not None:
                self._spawn(self._release, start)

    def _skip(self, kind: str, pod: dict[str, Any]) -> bool:
        """Whether to leave ``pod`` alone: one found invalid before (told once already), or one in
        a namespace not served (no rights there to bind it: logged once)."""
        meta = pod["metadata"]
        served = self.options.namespaces is None or meta["namespace"] in self.options.namespaces
        with self._lock:
            if meta["uid"] in self._skipped:
                if kind == "DELETED":
                    self._skipped.discard(meta["uid"])
                return True
            if served or kind == "DELETED":
                return not served
            self._skipped.add(meta["uid"])
        log.warning("pod %s/%s names %s, but namespace %s is not served (--function-namespaces): left pending",
                    meta["namespace"], meta["name"], SCHEDULER_NAME, meta["namespace"])
        return True

    def _helper_event(self, kind: str, pod: dict[str, Any]) -> None:
        phase = (pod.get("status") or {}).get("phase")
        if kind != "DELETED" and phase not in ("Failed", "Succeeded"):
            return
        name = pod["metadata"]["name"]
        with self._lock:
            starts = list(self._starts.values())
        for start in starts:
            for worker in start.launcher.workers[1:] if start.launcher else []:
                if worker.name == name and not worker.stopped:
                    worker.mark_lost("helper pod deleted" if kind == "DELETED" else f"helper pod {phase}")
                    if start.group is not None:
                        self._spawn(self._fail, start, f"helper {name} lost")

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        def guarded() -> None:
            try:
                target(*args)
            except Exception:  # never strand a pod: forget it, the next resync or event starts it again
                log.exception("interceptor %s failed", target.__name__)
                self._forget(args[0])

        thread = threading.Thread(target=guarded, name=f"interceptor-{target.__name__}", daemon=True)
        with self._lock:
            self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    # ---- a cold start ----------------------------------------------------------------------------
    def _cold_start(self, start: _Start) -> None:
        pod, name = start.pod, f"{start.pod['metadata']['namespace']}/{start.pod['metadata']['name']}"
        try:
            function = function_of(pod)
            refused = admission_problem(pod, function.model_uri, self.options.model_allowlist)
            if refused:
                raise ValueError(refused)  # before its Secret, its model's description, any prefetch
            spec = self._spec(function)
        except (ValueError, ValidationError, HydraError) as exc:
            self._mark_skipped(start, str(exc))
            return
        start.function = function
        self._prepare_function(pod, function)
        exclude: list[str] = []
        failures = 0
        while not start.deleted.is_set() and not self._stop.is_set():
            timeline = Timeline()
            timeline.mark(Moment.POD_PENDING, component="interceptor", pod=name)
            launcher = PodLauncher(self._core, pod, cancel=self._stop)
            coldstart = self._coldstart(launcher)
            start.launcher, start.coldstart = launcher, coldstart
            try:
                group = coldstart.run(spec, timeline, revision=(pod["metadata"].get("labels") or {}).get(
                    REVISION_LABEL, ""), exclude_nodes=exclude, on_plan=self._on_plan(start, launcher))
            except ConflictError as exc:  # bound already: by an earlier attempt or incarnation
                log.info("pod %s: %s", name, exc.message)
                self.metrics.cold_starts.labels("conflict").inc()
                self._forget(start)
                return
            except HydraError as exc:
                if start.deleted.is_set():
                    log.info("pod %s deleted during its cold start (%s)", name, exc.message)
                    self.metrics.cold_starts.labels("deleted").inc()
                    self._forget(start)
                    return
                if launcher.bound:
                    log.warning("pod %s failed after binding (%s): deleting it so Knative makes another",
                                name, exc.message)
                    self.metrics.cold_starts.labels("failed_after_binding").inc()
                    self._delete_function_pod(start)
                    self._forget(start)
                    return
                self.metrics.cold_starts.labels("failed_before_binding").inc()
                if isinstance(exc, InstanceFailedError):
                    exclude = sorted(set(exclude) | set(exc.nodes))
                delay = self._retry_delay(failures, exc.retry_after_s)
                failures += 1
                log.warning("pod %s: cold start failed before binding (%s): retrying in %.1f s", name, exc.message,
                            delay)
                self._stop.wait(delay)
                self.refresh_nodes()
                continue
            start.group = group
            timeline.mark(Moment.INSTANCE_READY, component="interceptor", nodes=group.plan.nodes)
            self.metrics.cold_starts.labels("serving").inc()
            self.metrics.cold_start_seconds.observe(timeline.events[-1].at - timeline.events[0].at)
            self._count_groups()
            self._record_timeline(start, timeline, group)
            log.info("pod %s serves: instance %s on %s", name, group.instance_id, ", ".join(group.plan.nodes))
            if start.deleted.is_set():  # deleted between its readiness and now
                self._release(start)
            return

    def _retry_delay(self, failures: int, hint_s: float | None) -> float:
        """Exponential back-off with a cap: a pod that cannot be placed (no capacity, a planner
        down) is tried less and less often instead of every few seconds for as long as it waits."""
        backoff = self.options.retry_s * 2 ** min(failures, 32)
        return min(self.options.retry_max_s, max(hint_s or 0.0, backoff))

    def _mark_skipped(self, start: _Start, reason: str) -> None:
        """A pod whose annotations say too little to start it: logged and marked with an Event
        once, then left alone (the next resync finds it again and skips it) until deleted."""
        meta = start.pod["metadata"]
        log.error("pod %s/%s cannot be started: %s", meta["namespace"], meta["name"], reason)
        self.metrics.cold_starts.labels("invalid").inc()
        with self._lock:
            self._skipped.add(meta["uid"])
        pod_event(self._core, start.pod, "InvalidFunctionPod", f"{SCHEDULER_NAME} cannot start this pod: {reason}")
        self._forget(start)

    def _on_plan(self, start: _Start, launcher: PodLauncher) -> Callable[[Plan], None]:
        def planned(plan: Plan) -> None:
            launcher.use_plan(plan)
            self._worker_secret(start)  # a token for the plan's nodes before any of its pods starts
        return planned

    def _worker_secret(self, start: _Start) -> None:
        """The function's worker Secret, with a token for every node its pods are planned on (of
        every pod of the function we watch), renewed when due. Failing does not stop the cold
        start: its workers read S3 themselves (the token is optional)."""
        pod, function = start.pod, start.function
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        if function is None:
            return
        with self._lock:
            nodes = {st.node for s in self._starts.values() if s.function is not None
                     and s.function.name == function.name and s.pod["metadata"]["namespace"] == namespace
                     and s.launcher is not None and s.launcher.plan is not None for st in s.launcher.plan.stages}
        if not nodes:
            return
        try:
            with self._secret_lock:
                ensure_worker_secret(self._core, namespace, function.name, function.model_uri,
                                     self._feed.loaderd_token, nodes, ttl_s=self.options.worker_token_ttl_s)
        except ForeignSecretError as exc:  # someone's own Secret: refused, and told where they look
            log.warning("pod %s/%s: %s", namespace, name, exc.message)
            pod_event(self._core, pod, "WorkerSecretNotOurs", exc.message)
        except HydraError as exc:
            log.warning("pod %s/%s: no worker secret (%s)", namespace, name, exc.message)

    def _renew_worker_secrets(self) -> None:
        """Every resync: each served function's worker token renewed well before it expires (a
        Secret not due is only read)."""
        with self._lock:
            starts = {(s.pod["metadata"]["namespace"], s.function.name): s for s in self._starts.values()
                      if s.function is not None and s.launcher is not None and s.launcher.plan is not None}
        for start in starts.values():
            self._worker_secret(start)

    def _prepare_function(self, pod: dict[str, Any], function: FunctionConfig) -> None:
        """The function's NetworkPolicy in its namespace (its worker Secret comes with its plan:
        the token names the plan's nodes). Failing does not stop the cold start: a policy
        missing leaves the namespace as open as it was."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        try:
            ensure_network_policy(NetworkingV1Api(self._core.api_client), namespace, function.name,
                                  self.options.control_namespace)
        except HydraError as exc:
            log.warning("pod %s/%s: no network policy (%s)", namespace, name, exc.message)

    def _record_timeline(self, start: _Start, timeline: Timeline, group: Group) -> None:
        """The cold start's timeline on its function pod (``kn hydra describe`` shows it), with
        the workers' own start-up events when they answer."""
        try:
            timeline = timeline.merged(group.head.timeline()).merged(group.stage_timelines)
        except HydraError:
            pass  # the interceptor's own events still tell the placement, fetch and readiness
        meta = start.pod["metadata"]
        patch = {"metadata": {"annotations": {TIMELINE_ANNOTATION: timeline.model_dump_json()}}}
        try:
            self._core.patch_namespaced_pod(meta["name"], meta["namespace"], patch)
        except ApiException as exc:
            log.warning("could not record the timeline on pod %s: %s %s", meta["name"], exc.status, exc.reason)

    def _adopt(self, start: _Start) -> None:
        """A group an earlier leader started: watched from now on as if we had started it (its
        memory is counted from its pods' annotations, not re-reserved)."""
        plan = plan_of_pod(start.pod)
        assert plan is not None
        try:
            start.function = function_of(start.pod)  # its worker Secret is renewed from now on
        except (ValueError, ValidationError, HydraError):
            start.function = None
        launcher = PodLauncher(self._core, start.pod, cancel=self._stop)
        try:
            workers = launcher.adopt(plan)
        except HydraError as exc:
            log.warning("could not take over pod %s: %s", start.pod["metadata"]["name"], exc.message)
            self._forget(start)
            return
        coldstart = self._coldstart(launcher)
        group = Group(plan, list(workers), [plan.stages[w.stage] for w in workers])
        start.launcher, start.coldstart, start.group = launcher, coldstart, group
        coldstart.resume(group, Timeline())
        self.metrics.adopted.inc()
        self._count_groups()
        log.info("took over pod %s (instance %s, %d workers)", start.pod["metadata"]["name"], plan.instance_id,
                 len(workers))
        if start.deleted.is_set():
            self._release(start)

    def _coldstart(self, launcher: PodLauncher) -> ColdStart:
        with self._lock:
            nodes = dict(self._nodes)
        return ColdStart(self._placement, launcher, nodes, self.options.coldstart)

    def _spec(self, function: FunctionConfig) -> FunctionSpec:
        """The function's model description, read once per (function, model, SLOs). On Knative a
        group keeps one full worker: scaling out is Knative's (more pods), not a replica's."""
        key = function.model_dump_json()
        spec = self._specs.get(key)
        if spec is None:
            spec = self._describe(function).model_copy(update={"min_full_workers": 1, "max_full_workers": 1})
            self._specs[key] = spec
        return spec

    def _release(self, start: _Start) -> None:
        if start.coldstart is not None and start.group is not None:
            start.coldstart.stop(start.group)
        self._forget(start)

    def _fail(self, start: _Start, reason: str) -> None:
        with self._lock:  # a helper's MODIFIED and DELETED, a lost node: fail it once
            if start.failing.is_set():
                return
            start.failing.set()
        if start.coldstart is not None and start.group is not None:
            start.coldstart.fail(start.group, reason)
            self.metrics.groups_failed.inc()
        self._delete_function_pod(start)
        self._forget(start)

    def _delete_function_pod(self, start: _Start) -> None:
        meta = start.pod["metadata"]
        delete_quietly(lambda n, ns: self._core.delete_namespaced_pod(n, ns, body={"preconditions": {"uid": meta["uid"]}}),
                       meta["name"], meta["namespace"], f"pod {meta['name']}")

    def _forget(self, start: _Start) -> None:
        with self._lock:
            self._starts.pop(start.pod["metadata"]["uid"], None)
        self._count_groups()

    def _count_groups(self) -> None:
        with self._lock:
            self.metrics.groups.set(sum(1 for s in self._starts.values() if s.group is not None))

    # ---- for tests and the CLI --------------------------------------------------------------------
    def groups(self) -> dict[str, Group]:
        """The function pods (uid) that serve, and their groups."""
        with self._lock:
            return {uid: s.group for uid, s in self._starts.items() if s.group is not None}

    def plans(self) -> list[Plan]:
        with self._lock:
            return [s.launcher.plan for s in self._starts.values() if s.launcher and s.launcher.plan]

    def wait_idle(self, timeout_s: float) -> bool:
        """Whether every thread it started has ended within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)
