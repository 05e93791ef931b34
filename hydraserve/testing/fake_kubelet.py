"""The kubelet's part for one pod, played by a test against the fake API server: the pod's
container command runs as a local process with the pod's environment (values, and secretKeyRef
read from the API as the kubelet would), its Secret volumes as files in a directory of its own
(written again, by a rename as the kubelet does, on ``sync_secret_volumes``; an environment
value naming a file under the mount names it there) and its annotations written as the Downward API file
(one key="value" per line, Go-quoted), on a loopback address standing in for its pod IP; the
pod turns Ready once its readiness probe (queue-proxy's probe of /readyz) answers 200.

Two differences from a pod: the worker is pinned to the pod IP with HYDRASERVE_HOST (a pod
listens on 0.0.0.0 of its own network namespace; a test must stay on loopback), and cluster DNS
is stood in for by tests/kube/cluster_dns (each headless Service's name resolves to the IP of
the pod its selector picks, read from the API when the container starts).
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import requests
from kubernetes.client import CoreV1Api

from hydraserve.contracts.pod import ROLE_FILE_KEY
from hydraserve.processes import ChildProcess

CLUSTER_DNS = Path(__file__).with_name("cluster_dns")


def go_quote(value: str) -> str:
    """strconv.Quote for ASCII text (what the kubelet writes for our JSON, which is ASCII)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def downward_annotations(annotations: dict[str, str]) -> str:
    return "".join(f"{key}={go_quote(value)}\n" for key, value in sorted(annotations.items()))


class ProcessKubelet:
    def __init__(self, core: CoreV1Api, namespace: str, name: str, ip: str, run_dir: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.core, self.namespace, self.name, self.ip, self.run_dir = core, namespace, name, ip, run_dir
        self.extra_env = extra_env or {}
        self.process: ChildProcess | None = None
        self.placed = False
        self._pod: dict[str, Any] = {}

    def _secret_value(self, ref: dict[str, Any]) -> str | None:
        try:
            secret = self.core.read_namespaced_secret(ref["name"], self.namespace)
        except Exception:
            if ref.get("optional"):
                return None
            raise
        return base64.b64decode(secret.data[ref["key"]]).decode()

    def cluster_dns(self) -> dict[str, str]:
        """Each headless Service's DNS name -> the IP of the pod its selector picks."""
        out = {}
        for service in self.core.list_namespaced_service(self.namespace).items:
            selector = ",".join(f"{k}={v}" for k, v in (service.spec.selector or {}).items())
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items if selector else []
            ips = [p.status.pod_ip for p in pods if p.status and p.status.pod_ip]
            if ips:
                out[f"{service.metadata.name}.{self.namespace}.svc"] = ips[0]
        return out

    def place(self) -> None:
        """The pod's sandbox exists: it has its IP (before any of a group's containers start,
        so each finds its peers' names resolving)."""
        self.core.patch_namespaced_pod_status(self.name, self.namespace, {"status": {
            "phase": "Running", "podIP": self.ip, "conditions": [{"type": "PodScheduled", "status": "True"},
                                                                  {"type": "Ready", "status": "False"}]}})
        self.placed = True

    def start(self) -> None:
        if not self.placed:
            self.place()
        pod = self.core.api_client.sanitize_for_serialization(self.core.read_namespaced_pod(self.name, self.namespace))
        container = next(c for c in pod["spec"]["containers"] if c["name"] != "queue-proxy")
        env = {**os.environ, **self.extra_env}
        for source in container.get("envFrom", []):
            secret = self.core.read_namespaced_secret(source["secretRef"]["name"], self.namespace)
            env |= {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif (ref := (item.get("valueFrom") or {}).get("secretKeyRef")) is not None:
                value = self._secret_value(ref)
                if value is not None:
                    env[item["name"]] = value
        for mount_path, local in self._secret_mounts(pod, container).items():
            env |= {k: local + v[len(mount_path):] for k, v in env.items() if v.startswith(mount_path + "/")}
        self._pod = pod
        self.sync_secret_volumes()
        if ROLE_FILE_KEY in env:  # the Downward API volume, mounted where the template says
            role_file = self.run_dir / f"{self.name}.annotations"
            role_file.write_text(downward_annotations(pod["metadata"].get("annotations") or {}))
            env[ROLE_FILE_KEY] = str(role_file)
        env |= {"PORT": "8080", "HYDRASERVE_HOST": self.ip, "K_SERVICE": pod["metadata"]["labels"].get(
            "serving.knative.dev/service", "")}
        env |= {"PYTHONPATH": os.pathsep.join([str(CLUSTER_DNS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "HYDRASERVE_TEST_DNS": json.dumps(self.cluster_dns())}
        argv = [sys.executable, "-m", "hydraserve.cli", *container.get("args", ["serve"])]
        self.process = ChildProcess(self.name, argv, log_path=self.run_dir / f"{self.name}.log", env=env)

    def _secret_mounts(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """Each Secret volume's mount path -> the local directory standing in for it."""
        secrets = {v["name"] for v in pod["spec"].get("volumes") or [] if "secret" in v}
        return {m["mountPath"]: str(self.run_dir / f"{self.name}.{m['name']}")
                for m in container.get("volumeMounts") or [] if m["name"] in secrets}

    def sync_secret_volumes(self) -> None:
        """Write each Secret volume's files from the Secret as it is now (an optional Secret not
        there: an empty directory), each file replaced atomically."""
        pod = self._pod
        container = next(c for c in pod["spec"]["containers"] if c["name"] != "queue-proxy")
        volumes = {v["name"]: v["secret"] for v in pod["spec"].get("volumes") or [] if "secret" in v}
        for mount in container.get("volumeMounts") or []:
            source = volumes.get(mount["name"])
            if source is None:
                continue
            local = self.run_dir / f"{self.name}.{mount['name']}"
            local.mkdir(exist_ok=True)
            try:
                data = self.core.read_namespaced_secret(source["secretName"], self.namespace).data or {}
            except Exception:
                if source.get("optional"):
                    continue
                raise
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] in data:
                    incoming = local / f".{item['path']}.new"
                    incoming.write_bytes(base64.b64decode(data[item["key"]]))
                    os.replace(incoming, local / item["path"])

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """queue-proxy's part: probe /readyz; then the pod is Ready."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert not self.process.lost(), self.process.log_tail(40)
            try:
                if requests.get(f"http://{self.ip}:8080/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"pod {self.name} never ready:\n{self.process.log_tail(40)}")
        self.core.patch_namespaced_pod_status(self.name, self.namespace, {"status": {"conditions": [
            {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}})

    def stop(self) -> int | None:
        return self.process.stop(grace_s=20) if self.process is not None else None
