"""`hydraserve interceptor` as a real process against the fake API server over HTTP: it takes
the Lease, describes the function's model from S3 (the embedded S3 server), binds the function
pod, serves the placement API, and on SIGTERM gives the Lease up and exits 0; of two replicas,
only the one holding the Lease answers the placement API."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import yaml
from kubernetes.client import CoordinationV1Api

from hydraserve.cli.interceptor import served_namespaces
from hydraserve.processes import ChildProcess, free_port, hydraserve_command
from tests.kube.conftest import Cluster, fake_only
from tests.kube.test_interceptor import bound_node, function_pod

PLACEMENT = {"Authorization": "Bearer placement-secret-token"}


def replica(cluster: Cluster, tmp_path: Path, identity: str, *extra: str, env: dict[str, str] | None = None
            ) -> tuple[ChildProcess, int]:
    """One replica of the control plane as its own process (tokens in 0600 files, the fake's
    kubeconfig), and its placement API's port."""
    assert cluster.fake is not None
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(cluster.fake.kubeconfig()))
    tokens = {}
    for name in ("placement", "loaderd"):
        tokens[name] = tmp_path / f"{name}-token"
        tokens[name].write_text(f"{name}-secret-token")
        tokens[name].chmod(0o600)
    port = free_port()
    process = ChildProcess(identity, hydraserve_command(
        "interceptor", "--kubeconfig", str(kubeconfig), "--namespace", cluster.namespace, "--identity", identity,
        "--port", str(port), "--placement-token-file", str(tokens["placement"]),
        "--loaderd-token-file", str(tokens["loaderd"]), *extra),
        log_path=tmp_path / f"{identity}.log", env={**os.environ, **(env or {})})
    return process, port


def holder(cluster: Cluster) -> str | None:
    leases = CoordinationV1Api(cluster.core.api_client)
    return leases.read_namespaced_lease("hydraserve-interceptor", cluster.namespace).spec.holder_identity


@fake_only
def test_the_control_plane_process_leads_binds_and_hands_over(cluster: Cluster, tiny_llama_dir: Path,
                                                              s3_server: Any, tmp_path: Path) -> None:
    assert cluster.fake is not None
    s3_server.create_bucket("cmd-models")
    model = s3_server.upload_dir(tiny_llama_dir, "cmd-models", "tiny")
    cluster.add_node("gpu-a")
    process, port = replica(cluster, tmp_path, "replica-1", "--endpoint-url", s3_server.endpoint_url,
                            env=s3_server.client_env())
    try:
        process.wait_healthy(f"http://127.0.0.1:{port}/healthz", 60)
        function_pod(cluster, "chat-00001-deployment-cmd", model=model)
        deadline = time.monotonic() + 60
        while not bound_node(cluster, "chat-00001-deployment-cmd") and time.monotonic() < deadline:
            assert not process.lost(), process.log_tail()
            time.sleep(0.1)
        assert bound_node(cluster, "chat-00001-deployment-cmd") == "gpu-a", process.log_tail()
        assert holder(cluster) == "replica-1"
        status = requests.get(f"http://127.0.0.1:{port}/v1/cluster", timeout=5, headers=PLACEMENT).json()
        assert status["active_plans"] == 1 and [n["name"] for n in status["nodes"]] == ["gpu-a"]
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "hydraserve_interceptor_leading 1.0" in metrics and "hydraserve_placement_plans_total" in metrics
    finally:
        code = process.stop(grace_s=30)
    assert code == 0, process.log_tail()
    assert holder(cluster) is None
    log = (tmp_path / "replica-1.log").read_text()
    assert "secret-token" not in log
    assert any(json.loads(line).get("event") == "leading" for line in log.splitlines() if line.startswith("{\"event"))


def test_the_function_namespaces_setting() -> None:
    assert served_namespaces("default, team-a,,") == frozenset({"default", "team-a"})
    assert served_namespaces("*") is None  # every namespace


@fake_only
def test_only_the_replica_holding_the_lease_answers_the_placement_api(cluster: Cluster, tmp_path: Path) -> None:
    """Two replicas behind one Service: the follower's placement state is fed by nobody, so it
    answers 503 not_leader (Retry-After) until the leader goes and it takes the Lease."""
    cluster.add_node("gpu-a")
    first, first_port = replica(cluster, tmp_path, "replica-1")
    second: ChildProcess | None = None
    try:
        first.wait_healthy(f"http://127.0.0.1:{first_port}/healthz", 60)
        wait_until(lambda: holder(cluster) == "replica-1", first)
        second, second_port = replica(cluster, tmp_path, "replica-2")
        second.wait_healthy(f"http://127.0.0.1:{second_port}/healthz", 60)  # its probes stay green
        wait_until(lambda: placement_answer(first_port)[0] == 200, first)  # the leader's view is the cluster's
        status, body, retry_after = placement_answer(second_port)
        assert (status, body["error"]["code"], retry_after) == (503, "not_leader", "2")
        assert first.stop(grace_s=30) == 0  # gives the Lease up
        wait_until(lambda: holder(cluster) == "replica-2", second)
        wait_until(lambda: placement_answer(second_port)[0] == 200, second)
        assert [n["name"] for n in placement_answer(second_port)[1]["nodes"]] == ["gpu-a"]
    finally:
        for process in (first, second):
            if process is not None:
                assert process.stop(grace_s=30) == 0, process.log_tail()


def placement_answer(port: int) -> tuple[int, Any, str | None]:
    """GET /v1/cluster: its status, body and Retry-After."""
    answer = requests.get(f"http://127.0.0.1:{port}/v1/cluster", timeout=5, headers=PLACEMENT)
    return answer.status_code, answer.json(), answer.headers.get("Retry-After")


def wait_until(check: Callable[[], bool], process: ChildProcess, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert not process.lost() and time.monotonic() < deadline, process.log_tail()
        time.sleep(0.1)
