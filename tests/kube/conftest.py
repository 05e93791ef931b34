"""The Kubernetes API the interceptor tests run against: the fake API server over real HTTP
(hydraserve/testing/fake_apiserver.py says what it emulates and what not) or, when KUBECONFIG is set, a
real cluster (then in a namespace of the test's own, deleted at the end).

On the fake there is no kubelet: ``cluster.run_pod`` plays its part (phase Running, a pod IP,
Ready), as a kubelet would after the pod's containers started. On a real cluster it waits for
the real kubelet instead. Tests that must delete or create Nodes run on the fake only.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client import CoreV1Api

from hydraserve.testing.fake_apiserver import FakeApiServer

REAL = bool(os.environ.get("KUBECONFIG"))


@dataclass
class Cluster:
    core: CoreV1Api
    namespace: str
    fake: FakeApiServer | None

    def add_node(self, name: str, *, gpus: int = 1, gpu_memory_mib: int = 16384, ready: bool = True) -> None:
        """A GPU node (fake only: a real cluster has its own)."""
        assert self.fake is not None, "only the fake cluster can be given nodes"
        self.core.create_node({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.memory": str(gpu_memory_mib)}},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "8", "memory": "64Gi"},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})

    def set_node_ready(self, name: str, ready: bool) -> None:
        self.core.patch_node_status(name, {"status": {"conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]}})

    def run_pod(self, name: str, ip: str = "127.0.0.1", timeout_s: float = 120.0) -> None:
        """The kubelet's part: the pod runs and is Ready."""
        if self.fake is None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                pod = self.core.read_namespaced_pod(name, self.namespace)
                if any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []):
                    return
                time.sleep(1)
            raise AssertionError(f"pod {name} not ready within {timeout_s} s")
        self.core.patch_namespaced_pod_status(name, self.namespace, {"status": {
            "phase": "Running", "podIP": ip,
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}})

    def pods(self, **selectors: str) -> list[Any]:
        return self.core.list_namespaced_pod(self.namespace, **selectors).items

    def wait_for(self, what: str, check: Any, timeout_s: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if REAL:
        api = config.new_client_from_config(config_file=os.environ["KUBECONFIG"])
        core = CoreV1Api(api)
        namespace = f"hs-test-{uuid.uuid4().hex[:6]}"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        try:
            yield Cluster(core, namespace, None)
        finally:
            core.delete_namespace(namespace)
        return
    with FakeApiServer() as fake:
        core = CoreV1Api(config.new_client_from_config_dict(fake.kubeconfig()))
        yield Cluster(core, "default", fake)


fake_only = pytest.mark.skipif(REAL, reason="changes Nodes or plays the kubelet: runs on the fake API server only")
