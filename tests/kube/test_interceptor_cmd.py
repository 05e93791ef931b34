"""`hydraserve interceptor` as a real process against the fake API server over HTTP: it takes
the Lease, describes the function's model from S3 (the embedded S3 server), binds the function
pod, serves the placement API, and on SIGTERM gives the Lease up and exits 0."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from kubernetes.client import CoordinationV1Api

from hydraserve.processes import ChildProcess, free_port, hydraserve_command
from hydraserve.provider.knative.interceptor_cmd import served_namespaces
from tests.kube.conftest import Cluster, fake_only
from tests.kube.test_interceptor import bound_node, function_pod


@fake_only
def test_the_control_plane_process_leads_binds_and_hands_over(cluster: Cluster, tiny_llama_dir: Path,
                                                              s3_server: Any, tmp_path: Path) -> None:
    assert cluster.fake is not None
    s3_server.create_bucket("cmd-models")
    model = s3_server.upload_dir(tiny_llama_dir, "cmd-models", "tiny")
    cluster.add_node("gpu-a")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.fake.kubeconfig()))
    tokens = {}
    for name in ("placement", "loaderd"):
        tokens[name] = tmp_path / f"{name}-token"
        tokens[name].write_text(f"{name}-secret-token")
        tokens[name].chmod(0o600)
    port = free_port()
    process = ChildProcess("interceptor", hydraserve_command(
        "interceptor", "--kubeconfig", str(kubeconfig), "--namespace", cluster.namespace, "--identity", "replica-1",
        "--port", str(port), "--placement-token-file", str(tokens["placement"]),
        "--loaderd-token-file", str(tokens["loaderd"]), "--endpoint-url", s3_server.endpoint_url),
        log_path=tmp_path / "interceptor.log", env={**os.environ, **s3_server.client_env()})
    try:
        process.wait_healthy(f"http://127.0.0.1:{port}/healthz", 60)
        function_pod(cluster, "chat-00001-deployment-cmd", model=model)
        deadline = time.monotonic() + 60
        while not bound_node(cluster, "chat-00001-deployment-cmd") and time.monotonic() < deadline:
            assert not process.lost(), process.log_tail()
            time.sleep(0.1)
        assert bound_node(cluster, "chat-00001-deployment-cmd") == "gpu-a", process.log_tail()
        leases = CoordinationV1Api(cluster.core.api_client)
        assert leases.read_namespaced_lease("hydraserve-interceptor", cluster.namespace).spec.holder_identity == "replica-1"
        status = requests.get(f"http://127.0.0.1:{port}/v1/cluster", timeout=5,
                              headers={"Authorization": "Bearer placement-secret-token"}).json()
        assert status["active_plans"] == 1 and [n["name"] for n in status["nodes"]] == ["gpu-a"]
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "hydraserve_interceptor_leading 1.0" in metrics and "hydraserve_placement_plans_total" in metrics
    finally:
        code = process.stop(grace_s=30)
    assert code == 0, process.log_tail()
    assert leases.read_namespaced_lease("hydraserve-interceptor", cluster.namespace).spec.holder_identity is None
    log = (tmp_path / "interceptor.log").read_text()
    assert "secret-token" not in log
    assert any(json.loads(line).get("event") == "leading" for line in log.splitlines() if line.startswith("{\"event"))


def test_the_function_namespaces_setting() -> None:
    assert served_namespaces("default, team-a,,") == frozenset({"default", "team-a"})
    assert served_namespaces("*") is None  # every namespace
