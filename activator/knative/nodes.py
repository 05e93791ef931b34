"""The real cluster, told to the placement service: every node's devices and what is already on
them, and what each node's loaderd holds (asked of the daemon itself).

Because the interceptor replaces the default scheduler for function pods, the planner must see
what the cluster really holds, not only its own bookkeeping: a node's free memory per device is
its capacity minus what our pods were given (their annotations), minus whole devices other
pods requested (``nvidia.com/gpu``), minus the stages of cold starts still under way whose pods
do not exist yet. A node that is cordoned or not Ready is registered unschedulable; a loaderd
that restarted or was evicted holds nothing, and one that does not answer counts as holding
nothing (its node's workers then fetch from S3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiException, CoreV1Api

from hydraserve.activator.knative.pods import placed_memory
from hydraserve.auth import node_admin_token
from hydraserve.contracts.plan import NodeInfo
from hydraserve.contracts.pod import INSTANCE_LABEL, STAGE_LABEL
from hydraserve.errors import HydraError
from hydraserve.loaderd.client import LoaderClient
from hydraserve.provider.knative.kube import LOADERD_PORT, LOADERD_SELECTOR, api_error, daemon_urls
from hydraserve.provider.residency import Registrar, reconcile_node

log = logging.getLogger(__name__)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB per device (NVIDIA GPU feature discovery)
WORKER_MEMORY_LABEL = "hydraserve.dev/worker-memory-gb"  # a CPU node: what its one virtual device gives workers
NIC_LABEL = "hydraserve.dev/nic-gbps"

StageKey = tuple[str, str]  # (instance label, stage)


@dataclass(frozen=True)
class KubeNode:
    """How the cold start reaches a node's loaderd (NodeAccess)."""

    name: str
    loaderd_url: str
    loaderd_token: str = field(repr=False)  # this node's loaderd admin token
    ready: bool = True


@dataclass(frozen=True)
class Placed:
    """Memory given on a node's device to one stage of an instance (a pod, or a pod to come)."""

    node: str
    gpu: int
    gb: float


def _ready(node: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (node.status.conditions or []))


def _gpus(node: Any) -> int:
    try:
        return int((node.status.allocatable or {}).get(GPU_RESOURCE, "0"))
    except ValueError:
        return 0


class ClusterFeed:
    """Reads nodes, pods and daemons from the API and registers each node with the planner."""

    def __init__(self, core: CoreV1Api, placement: Registrar, *, loaderd_namespace: str, loaderd_token: str,
                 loaderd_selector: str = LOADERD_SELECTOR, loaderd_port: int = LOADERD_PORT,
                 cpu_worker_memory_gb: float = 16.0, nic_gbps: float = 16.0) -> None:
        self._core, self._placement = core, placement
        self._loaderd_ns, self._loaderd_selector, self._loaderd_port = loaderd_namespace, loaderd_selector, loaderd_port
        self.loaderd_token = loaderd_token  # the install's loaderd secret: never leaves the control plane
        # (each daemon is sent only its own node's admin token, derived from it)
        self._cpu_memory_gb, self._nic_gbps = cpu_worker_memory_gb, nic_gbps

    def refresh(self, under_way: Mapping[StageKey, Placed] | None = None) -> dict[str, KubeNode]:
        """Register every node (free memory, daemon, residency); the nodes as the cold start
        reaches them. ``under_way``: stages of cold starts planned but maybe not yet pods (taken
        before the pods are listed, so none is missed)."""
        placed = dict(under_way or {})
        try:
            nodes = self._core.list_node().items
            pods = self._core.list_pod_for_all_namespaces(
                field_selector="status.phase!=Succeeded,status.phase!=Failed").items
        except ApiException as exc:
            raise api_error(exc, "reading the cluster") from exc
        daemon_url = daemon_urls(self._core, self._loaderd_ns, selector=self._loaderd_selector,
                                 port=self._loaderd_port)
        foreign_gpus: dict[str, int] = {}
        for pod in pods:
            if not pod.spec.node_name:
                continue
            mine = self._ours(pod)
            if mine is not None:
                placed[mine[0]] = mine[1]
            else:
                foreign_gpus[pod.spec.node_name] = foreign_gpus.get(pod.spec.node_name, 0) + _requested_gpus(pod)
        out: dict[str, KubeNode] = {}
        for node in nodes:
            name = node.metadata.name
            info = self._node_info(node, placed.values(), foreign_gpus.get(name, 0), daemon_url.get(name))
            access = KubeNode(name=name, loaderd_url=daemon_url.get(name, ""),
                              loaderd_token=node_admin_token(self.loaderd_token, name), ready=info.schedulable)
            try:
                if access.loaderd_url:
                    loader = LoaderClient(access.loaderd_url, access.loaderd_token, timeout_s=2.0)
                    try:
                        reconcile_node(self._placement, info, loader)
                    finally:
                        loader.close()
                else:
                    self._placement.register_node(info.model_copy(update={"residency": []}))
            except HydraError as exc:
                log.warning("could not register node %s: %s", name, exc.message)
                continue
            out[name] = access
        return out

    @staticmethod
    def _ours(pod: Any) -> tuple[StageKey, Placed] | None:
        labels = pod.metadata.labels or {}
        if INSTANCE_LABEL not in labels:
            return None
        given = placed_memory(pod.metadata.annotations or {})
        if given is None:
            return None
        return (labels[INSTANCE_LABEL], labels.get(STAGE_LABEL, "0")), Placed(pod.spec.node_name, *given)

    def _node_info(self, node: Any, placed: Iterable[Placed], foreign_gpus: int, loaderd_url: str | None) -> NodeInfo:
        labels = node.metadata.labels or {}
        gpus = _gpus(node)
        if gpus:
            memory_gb = float(labels.get(GPU_MEMORY_LABEL, "16384")) / 1024
        else:  # a CPU node: one virtual device
            gpus, memory_gb = 1, float(labels.get(WORKER_MEMORY_LABEL, self._cpu_memory_gb))
        free = [memory_gb] * gpus
        for p in placed:
            if p.node == node.metadata.name and p.gpu < gpus:
                free[p.gpu] = max(0.0, free[p.gpu] - p.gb)
        for device in sorted(range(gpus), key=lambda d: -free[d])[:foreign_gpus]:
            free[device] = 0.0  # another scheduler's pod holds the whole device
        return NodeInfo(name=node.metadata.name, gpus=gpus, gpu_memory_gb=memory_gb, gpu_free_gb=free,
                        nic_gbps=float(labels.get(NIC_LABEL, self._nic_gbps)), loaderd_url=loaderd_url,
                        labels=dict(labels), schedulable=_ready(node) and not (node.spec and node.spec.unschedulable))


def _requested_gpus(pod: Any) -> int:
    total = 0
    for container in pod.spec.containers or []:
        limits = (container.resources.limits or {}) if container.resources else {}
        try:
            total += int(limits.get(GPU_RESOURCE, "0"))
        except ValueError:
            continue
    return total
