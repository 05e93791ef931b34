"""`kn hydra` (the installed kn-hydra executable, a real process) against the fake API server
over HTTP, or a real cluster with KUBECONFIG: create writes the Service the dry run prints,
list and describe show it (describe: the last cold start's plan and timeline, as the
interceptor wrote them on the function pod), delete removes it and its worker Secret."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from kubernetes.client import CustomObjectsApi

from tests.kube.conftest import REAL, Cluster, fake_only
from tests.kube.test_interceptor import Control, bound_node, function_pod
from tests.manifests.test_kn_hydra import kn_hydra


@pytest.fixture
def kube_env(cluster: Cluster, tmp_path: Path) -> dict[str, str]:
    if REAL:
        return dict(os.environ)
    assert cluster.fake is not None
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cluster.fake.kubeconfig()))
    return {**os.environ, "KUBECONFIG": str(path)}


def test_create_list_and_delete(cluster: Cluster, kube_env: dict[str, str]) -> None:
    ns = ["--namespace", cluster.namespace]
    flags = ["chat", "--model", "s3://models/tiny-chat", "--gpu", "0", *ns]
    done = kn_hydra("create", *flags, env=kube_env)
    assert done.returncode == 0 and "created" in done.stdout, done.stderr
    stored = CustomObjectsApi(cluster.core.api_client).get_namespaced_custom_object(
        "serving.knative.dev", "v1", cluster.namespace, "services", "chat")
    printed = yaml.safe_load(kn_hydra("create", *flags, "--dry-run", env=kube_env).stdout)
    assert stored["spec"] == printed["spec"]
    again = kn_hydra("create", *flags, env=kube_env)
    assert again.returncode == 1 and "409" in again.stderr and "Traceback" not in again.stderr
    listed = kn_hydra("list", *ns, env=kube_env)
    assert listed.returncode == 0 and any(line.split()[:2] == ["chat", "s3://models/tiny-chat"]
                                          for line in listed.stdout.splitlines()), listed.stdout
    described = kn_hydra("describe", "chat", *ns, env=kube_env)
    assert described.returncode == 0 and "none yet" in described.stdout, described.stderr
    gone = kn_hydra("delete", "chat", *ns, env=kube_env)
    assert gone.returncode == 0, gone.stderr
    missing = kn_hydra("describe", "chat", *ns, env=kube_env)
    assert missing.returncode == 1 and "404" in missing.stderr


@fake_only
def test_describe_shows_the_last_cold_starts_plan_and_timeline(cluster: Cluster, kube_env: dict[str, str],
                                                               tiny_llama_dir: Path) -> None:
    cluster.add_node("gpu-a")
    assert kn_hydra("create", "chat", "--model", "s3://models/tiny", "--gpu", "0", env=kube_env).returncode == 0
    with Control(cluster, tiny_llama_dir) as ctl:
        function_pod(cluster, "chat-00001-deployment-d")
        cluster.wait_for("the pod bound", lambda: bound_node(cluster, "chat-00001-deployment-d"))
        cluster.run_pod("chat-00001-deployment-d")
        cluster.wait_for("the group to serve", lambda: ctl.interceptor.groups())
        cluster.wait_for("its timeline recorded", lambda: "hydraserve.dev/timeline" in (
            cluster.core.read_namespaced_pod("chat-00001-deployment-d", cluster.namespace).metadata.annotations))
    out = kn_hydra("describe", "chat", env=kube_env)
    assert out.returncode == 0, out.stderr
    assert "Last cold start: pod chat-00001-deployment-d" in out.stdout
    assert "pipeline of 1 on gpu-a" in out.stdout and "stage 0: gpu-a gpu 0, layers 0-1" in out.stdout
    for event in ("pod_pending", "plan_decided", "worker_spawned", "instance_ready"):
        assert event in out.stdout
    assert "total (Kubernetes): pod pending -> group ready" in out.stdout
    assert cluster.core.read_namespaced_secret("chat-hydraserve-worker", cluster.namespace)
    assert kn_hydra("delete", "chat", env=kube_env).returncode == 0
    assert not [s for s in cluster.core.list_namespaced_secret(cluster.namespace).items
                if s.metadata.name == "chat-hydraserve-worker"]
