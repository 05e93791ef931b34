"""The cold start's launcher port over Kubernetes pods: stage 0 is the function's own pod
(Knative's; bound to its node with its role), every other stage a helper pod the interceptor
creates on its node (owned by the function pod, so it is collected with it).

A stage's peers dial it by a stable name, its headless Service (``publishNotReadyAddresses``:
the link comes up before the pod is ready), because pod IPs are not known when the group's
environments are written. A worker is ready when its pod's Ready
condition is true (for the function pod that is queue-proxy's probe of our /readyz, which says
ready only when the group serves); it is lost when its pod is gone, failed, or on a node the
interceptor saw go away.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Collection, Mapping
from typing import Any

from kubernetes.client import ApiException, CoreV1Api

from hydraserve.auth import mint_worker_token, node_admin_token
from hydraserve.contracts.plan import Plan
from hydraserve.contracts.pod import (
    INSTANCE_LABEL,
    PLAN_ANNOTATION,
    POD_LISTEN_HOST,
    ROLE_ANNOTATION,
    STAGE_LABEL,
    TRANSPORT_PORT,
    WORKER_SECRET_KEY,
    role_annotation,
    stage_service_name,
    worker_secret_name,
)
from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment, WorkerStatus
from hydraserve.errors import HydraError, PermanentError, TemporaryError
from hydraserve.provider.knative.kube import api_error, bind_pod, create_or_keep, delete_quietly
from hydraserve.provider.knative.service import (
    FUNCTION_LABEL,
    LIVENESS_PROBE,
    MODEL_ANNOTATION,
    RUNTIME_PORT,
    SCHEDULER_NAME,
    loaderd_mount,
    loaderd_volume,
    worker_secret_env,
    worker_secret_volume,
)
from hydraserve.provider.worker_port import WorkerSlot, worker_status, worker_timeline

log = logging.getLogger(__name__)

MEMORY_ANNOTATION = "hydraserve.dev/memory-gb"  # what the placement gave the pod's worker
GPU_ANNOTATION = "hydraserve.dev/gpu"  # which device of its node
QUEUE_PROXY = "queue-proxy"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"  # on the worker Secrets we write: only those we replace
MANAGED_BY = "hydraserve-interceptor"
TOKEN_NODES_ANNOTATION = "hydraserve.dev/token-nodes"  # on the worker Secret: the nodes its token is for
TOKEN_EXPIRES_ANNOTATION = "hydraserve.dev/token-expires"  # ... and when it expires (unix s)
WORKER_TOKEN_TTL_S = 12 * 3600.0  # renewed once half of it is left: the control plane may be away 6 h


class ForeignSecretError(PermanentError):
    """A function's worker Secret name is taken by a Secret the interceptor did not write."""

    error_code = "foreign_secret"


def instance_key(instance_id: str) -> str:
    """The label value naming an instance (label values are at most 63 characters)."""
    return stage_service_name(instance_id, 0).removesuffix("-s0")


def user_container(pod: dict[str, Any]) -> dict[str, Any]:
    """The function's container in its pod (not Knative's queue-proxy)."""
    for container in pod["spec"]["containers"]:
        if container.get("name") != QUEUE_PROXY:
            return dict(container)
    raise TemporaryError(f"pod {pod['metadata']['name']} has no function container")


def owner_reference(pod: dict[str, Any]) -> dict[str, Any]:
    meta = pod["metadata"]
    return {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}


class PodWorker:
    """One stage's pod as the cold start sees it (LaunchedWorker)."""

    adopted = False

    def __init__(self, core: CoreV1Api, namespace: str, name: str, *, stage: int, node: str,
                 cancel: threading.Event | None = None, poll_s: float = 0.25) -> None:
        self._core, self.namespace, self.name, self.stage, self.node = core, namespace, name, stage, node
        self.helper = stage > 0  # a pod of ours (stage 0 is the function's own, Knative's)
        self._cancel = cancel or threading.Event()  # set: stop waiting (the interceptor stops)
        self._poll_s = poll_s
        self.spawned_at = time.time()
        self.url = ""  # http://<pod IP>:8080 once the pod has one
        self.stopped = False
        self._lost = threading.Event()
        self._lost_reason = ""

    def seen(self, pod: dict[str, Any]) -> None:
        """What the API last said of its pod (its IP)."""
        pod_ip = (pod.get("status") or {}).get("podIP")
        if pod_ip:
            self.url = f"http://{pod_ip}:{RUNTIME_PORT}"

    def mark_lost(self, reason: str) -> None:
        """Its pod is gone, failed or on a lost node (the interceptor's watch says so)."""
        if not self.stopped and not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._lost.is_set():
                raise TemporaryError(f"pod {self.name}: {self._lost_reason}")
            if self._cancel.is_set():
                raise TemporaryError(f"pod {self.name}: no longer waited for (the interceptor stops)")
            try:
                pod = self._core.read_namespaced_pod(self.name, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    self.mark_lost("deleted")
                    continue
                raise api_error(exc, f"reading pod {self.name}") from exc
            self.seen({"status": {"podIP": pod.status.pod_ip if pod.status else None}})
            phase = pod.status.phase if pod.status else None
            if phase in ("Failed", "Succeeded"):
                self.mark_lost(f"its container ended ({phase})")
                continue
            if pod.metadata.deletion_timestamp:
                self.mark_lost("being deleted")
                continue
            if any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or [])):
                return
            if time.monotonic() > deadline:
                raise TemporaryError(f"pod {self.name} not ready within {timeout_s:.0f} s")
            self._lost.wait(self._poll_s)

    def stop(self, grace_s: float = 10.0) -> None:
        """A helper pod is deleted; the function pod is Knative's (it scales it down)."""
        self.stopped = True
        if self.helper:
            delete_quietly(lambda n, ns: self._core.delete_namespaced_pod(
                n, ns, grace_period_seconds=max(0, round(grace_s))), self.name, self.namespace, f"pod {self.name}")

    def status(self) -> WorkerStatus:
        return worker_status(self._address())

    def timeline(self) -> Timeline:
        return worker_timeline(self._address())

    def _address(self) -> str:
        if not self.url:
            raise TemporaryError(f"pod {self.name} has no IP yet")
        return self.url


class PodLauncher:
    """Launches one function pod's group (WorkerLauncher): ``reserve`` is called once per stage,
    in stage order, then ``launch`` in the same order."""

    def __init__(self, core: CoreV1Api, function_pod: dict[str, Any], cancel: threading.Event | None = None) -> None:
        self._core = core
        self._cancel = cancel
        self.pod = function_pod
        self.namespace: str = function_pod["metadata"]["namespace"]
        self.function: str = (function_pod["metadata"].get("labels") or {}).get(
            "serving.knative.dev/service", function_pod["metadata"]["name"])
        self.plan: Plan | None = None  # told by the cold start (``use_plan``) before any reserve
        self._reserved = 0
        self._launched = 0
        self.workers: list[PodWorker] = []
        self.bound = False

    def use_plan(self, plan: Plan) -> None:
        self.plan = plan

    def adopt(self, plan: Plan) -> list[PodWorker]:
        """The workers of a group bound before a restart, from the API (stage order; a helper
        that is gone is left out)."""
        self.plan, self.bound = plan, True
        meta = self.pod["metadata"]
        head = PodWorker(self._core, self.namespace, meta["name"], stage=0, node=self.pod["spec"]["nodeName"],
                         cancel=self._cancel)
        head.seen(self.pod)
        try:
            found = self._core.list_namespaced_pod(
                self.namespace, label_selector=f"{INSTANCE_LABEL}={instance_key(plan.instance_id)},{STAGE_LABEL}!=0")
        except ApiException as exc:
            raise api_error(exc, f"listing the helpers of {meta['name']}") from exc
        sanitize = self._core.api_client.sanitize_for_serialization
        helpers = sorted((sanitize(p) for p in found.items), key=lambda p: int(p["metadata"]["labels"][STAGE_LABEL]))
        self.workers = [head]
        for pod in helpers:
            worker = PodWorker(self._core, self.namespace, pod["metadata"]["name"],
                               stage=int(pod["metadata"]["labels"][STAGE_LABEL]), node=pod["spec"]["nodeName"],
                               cancel=self._cancel)
            worker.seen(pod)
            self.workers.append(worker)
        return self.workers

    def reserve(self, node: str) -> WorkerSlot:
        """A stage's stable name: its headless Service (a group's stages dial each other by it)."""
        if self.plan is None:
            raise RuntimeError("PodLauncher.reserve before use_plan")
        stage = self._reserved
        self._reserved += 1
        host = f"{stage_service_name(self.plan.instance_id, stage)}.{self.namespace}.svc"
        return WorkerSlot(host=host, port=RUNTIME_PORT, transport_port=TRANSPORT_PORT)

    def launch(self, node: str, env: WorkerEnvironment) -> PodWorker:
        if self.plan is None:
            raise RuntimeError("PodLauncher.launch before use_plan")
        if self._cancel is not None and self._cancel.is_set():
            raise TemporaryError("the interceptor stops: no more pods bound or created")  # another may lead now
        stage = self._launched
        self._launched += 1
        st = self.plan.stages[stage]
        role = env.model_copy(update={"host": POD_LISTEN_HOST, "loaderd_lease": "heartbeat"})
        labels = {INSTANCE_LABEL: instance_key(env.instance_id), STAGE_LABEL: str(stage)}
        placed = {MEMORY_ANNOTATION: f"{st.memory_gb:g}", GPU_ANNOTATION: str(st.gpu)}
        if stage == 0:
            worker = self._bind_function_pod(node, role, labels, placed, self.plan)
        else:
            worker = self._create_helper(node, role, labels, placed, stage)
        if self.plan.pipeline_size > 1:
            self._stage_service(env.instance_id, stage, labels, worker)
        self.workers.append(worker)
        return worker

    # ---- stage 0: the function pod ------------------------------------------------------------
    def _bind_function_pod(self, node: str, role: WorkerEnvironment, labels: dict[str, str],
                           placed: dict[str, str], plan: Plan) -> PodWorker:
        name = self.pod["metadata"]["name"]
        annotations = {ROLE_ANNOTATION: role_annotation(role.model_dump(mode="json")), **placed,
                       PLAN_ANNOTATION: plan.model_copy(update={"candidates": []}).model_dump_json()}
        bind_pod(self._core, self.namespace, name, node, annotations)
        self.bound = True
        labels = {**labels, FUNCTION_LABEL: self.function}  # a revision not made by kn hydra lacks it
        try:  # after the binding, so a pod someone else bound is never marked ours
            self._core.patch_namespaced_pod(name, self.namespace, {"metadata": {"labels": labels}})
        except ApiException as exc:
            raise api_error(exc, f"labelling pod {name}") from exc
        log.info("bound pod %s/%s to %s", self.namespace, name, node)
        return PodWorker(self._core, self.namespace, name, stage=0, node=node, cancel=self._cancel)

    # ---- stages 1..p-1: helper pods -------------------------------------------------------------
    def _create_helper(self, node: str, role: WorkerEnvironment, labels: dict[str, str],
                       placed: dict[str, str], stage: int) -> PodWorker:
        name = f"{self.pod['metadata']['name']}-s{stage}"
        body = self.helper_pod(name, node, role, labels, placed)
        create_or_keep(self._core.create_namespaced_pod, self.namespace, body, f"pod {name}")
        log.info("created helper %s/%s on %s", self.namespace, name, node)
        return PodWorker(self._core, self.namespace, name, stage=stage, node=node, cancel=self._cancel)

    def helper_pod(self, name: str, node: str, role: WorkerEnvironment, labels: dict[str, str],
                   placed: dict[str, str]) -> dict[str, Any]:
        """A helper stage's pod: the function's image and resources, its model's loaderd directory
        (no other host path of the function pod's), its role in
        its environment, its loaderd token from the function's worker Secret,
        bound to ``node`` at creation (no scheduler), collected with the function pod."""
        source = user_container(self.pod)
        from_secret = worker_secret_env(self.function)
        dropped = {e["name"] for e in from_secret}
        env = [{"name": k, "value": v} for k, v in role.to_env().items() if k not in dropped] + from_secret
        model = (self.pod["metadata"].get("annotations") or {})[MODEL_ANNOTATION]
        secret_volume, secret_mount = worker_secret_volume(self.function)  # its renewed token, as a file
        host_volumes = [loaderd_volume(model), secret_volume]  # its model's segments only, and its token
        mounts = [loaderd_mount(model), secret_mount]
        container: dict[str, Any] = {
            "name": "stage", "image": source["image"], "args": source.get("args") or ["serve"], "env": env,
            "ports": [{"containerPort": RUNTIME_PORT, "name": "http"},
                      {"containerPort": TRANSPORT_PORT, "name": "stage-link"}],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": RUNTIME_PORT}, "periodSeconds": 1,
                               "failureThreshold": 600},
            "livenessProbe": {**LIVENESS_PROBE, "httpGet": {**LIVENESS_PROBE["httpGet"], "port": RUNTIME_PORT}},
            "resources": source.get("resources") or {}, "volumeMounts": mounts,
            "securityContext": source.get("securityContext") or {"allowPrivilegeEscalation": False},
        }
        if source.get("envFrom"):
            container["envFrom"] = source["envFrom"]
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace,
                         "labels": {**labels, FUNCTION_LABEL: self.function, "app.kubernetes.io/part-of": "hydraserve"},
                         "annotations": placed, "ownerReferences": [owner_reference(self.pod)]},
            "spec": {"nodeName": node, "schedulerName": SCHEDULER_NAME, "restartPolicy": "Never",
                     "automountServiceAccountToken": False, "enableServiceLinks": False,
                     "containers": [container], "volumes": host_volumes,
                     "tolerations": self.pod["spec"].get("tolerations") or []},
        }

    def _stage_service(self, instance_id: str, stage: int, labels: dict[str, str], worker: PodWorker) -> None:
        """The stage's stable DNS name, owned by its pod (collected with it)."""
        try:
            owner = self._core.read_namespaced_pod(worker.name, self.namespace)
        except ApiException as exc:
            raise api_error(exc, f"reading pod {worker.name}") from exc
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": stage_service_name(instance_id, stage), "namespace": self.namespace,
                         "labels": {**labels, "app.kubernetes.io/part-of": "hydraserve"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": worker.name,
                                              "uid": owner.metadata.uid}]},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels,
                     "ports": [{"name": "stage-link", "port": TRANSPORT_PORT, "targetPort": TRANSPORT_PORT}]},
        }
        create_or_keep(self._core.create_namespaced_service, self.namespace, body,
                       f"service {body['metadata']['name']}")


def ensure_worker_secret(core: CoreV1Api, namespace: str, function: str, model_uri: str, loaderd_secret: str,
                         nodes: Collection[str], *, now: float | None = None,
                         ttl_s: float = WORKER_TOKEN_TTL_S) -> None:
    """The function's worker Secret: a loaderd token that may read only its model, release only
    its own leases, at the loaderds of ``nodes`` only (where its pods run), until it expires (the
    daemons' own tokens never leave the control plane). Written again when the model changed, a
    node is not covered, or less than half its life is left: the interceptor calls this at every
    plan and every resync, and its pods re-read the file the Secret is mounted as, so a pod
    serving for days always holds a valid token. A renewal names exactly ``nodes`` (a node no pod
    of the function runs on drops out). A Secret of that name the interceptor did not write (no
    ``MANAGED_BY_LABEL``) is never touched (ForeignSecretError): it may be someone's own."""
    now = time.time() if now is None else now
    name = worker_secret_name(function)
    try:
        current = core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise api_error(exc, f"reading secret {name}") from exc
        current = None
    if current is not None and (current.metadata.labels or {}).get(MANAGED_BY_LABEL) != MANAGED_BY:
        raise ForeignSecretError(f"secret {namespace}/{name} exists and was not written by the interceptor "
                                 f"(no label {MANAGED_BY_LABEL}={MANAGED_BY}): left as it is")
    if current is not None and _token_current(current.metadata.annotations or {}, model_uri, nodes, now, ttl_s):
        return
    expires_at = int(now + ttl_s)
    token = mint_worker_token({n: node_admin_token(loaderd_secret, n) for n in nodes}, subject=f"{namespace}/{function}",
                              model_uri=model_uri, expires_at=expires_at)
    annotations = {MODEL_ANNOTATION: model_uri, TOKEN_NODES_ANNOTATION: ",".join(sorted(nodes)),
                   TOKEN_EXPIRES_ANNOTATION: str(expires_at)}
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations,
                         "labels": {FUNCTION_LABEL: function, "app.kubernetes.io/part-of": "hydraserve",
                                    MANAGED_BY_LABEL: MANAGED_BY}},
            "stringData": {WORKER_SECRET_KEY: token}}
    if current is None:
        create_or_keep(core.create_namespaced_secret, namespace, body, f"secret {name}")
    else:
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        try:
            core.replace_namespaced_secret(name, namespace, body)
        except ApiException as exc:
            raise api_error(exc, f"replacing secret {name}") from exc


def _token_current(annotations: Mapping[str, str], model_uri: str, nodes: Collection[str], now: float,
                   ttl_s: float) -> bool:
    """Whether a worker Secret's token is for ``model_uri``, covers ``nodes`` and has more than
    half its life left."""
    try:
        expires_at = float(annotations.get(TOKEN_EXPIRES_ANNOTATION, ""))
    except ValueError:
        return False
    covered = set(filter(None, annotations.get(TOKEN_NODES_ANNOTATION, "").split(",")))
    return annotations.get(MODEL_ANNOTATION) == model_uri and set(nodes) <= covered and expires_at - now > ttl_s / 2


def placed_memory(annotations: Mapping[str, str]) -> tuple[int, float] | None:
    """(device, GB) the placement gave a pod of ours, from its annotations."""
    try:
        return int(annotations[GPU_ANNOTATION]), float(annotations[MEMORY_ANNOTATION])
    except (KeyError, ValueError):
        return None


def plan_of_pod(pod: dict[str, Any]) -> Plan | None:
    """The plan a function pod was bound with (None for a pod we did not place)."""
    raw = (pod["metadata"].get("annotations") or {}).get(PLAN_ANNOTATION)
    if not raw:
        return None
    try:
        return Plan.model_validate(json.loads(raw))
    except (ValueError, HydraError):
        return None
