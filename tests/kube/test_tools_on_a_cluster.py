"""The embedded tools against a cluster (the fake API server over HTTP), as real processes:
`hydraserve loaderctl --node N` finds node N's loaderd through the API (the DaemonSet's pod
there) and talks to it; `hydraserve plan --cluster` plans against the cluster as the
interceptor sees it (nodes, memory our pods hold, what each loaderd holds). The gateway's
timeline on Kubernetes is `kn hydra describe` (tests/kube/test_kn_hydra_cluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.kube.conftest import Cluster, fake_only
from tests.kube.test_interceptor import LOADERD_TOKEN, node_with_loaderd


def hydraserve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hydraserve.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@fake_only
def test_loaderctl_and_plan_find_their_way_through_the_api(cluster: Cluster, tiny_llama_dir: Path, s3_server: Any,
                                                           shm_guard: str, tmp_path: Path) -> None:
    assert cluster.fake is not None
    node = shm_guard
    with node_with_loaderd(cluster, node, tiny_llama_dir, s3_server, tmp_path) as (_daemon, model, port):
        cluster.add_node("cpu-only", gpus=0)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(cluster.fake.kubeconfig()))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HYDRASERVE_LOADERD_TOKEN": LOADERD_TOKEN}
        where = ["--node", node, "--kube-namespace", cluster.namespace, "--port", str(port)]
        done = hydraserve("loaderctl", *where, "prefetch", model, "--wait", "--endpoint-url",
                          s3_server.endpoint_url, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["bytes_total"] > 0
        status = hydraserve("loaderctl", *where, "status", "--json", env=env)
        assert status.returncode == 0 and json.loads(status.stdout)["models"][0]["model_uri"] == model
        missing = hydraserve("loaderctl", "--node", "cpu-only", "--kube-namespace", cluster.namespace, "status", env=env)
        assert missing.returncode == 1 and "no loaderd running on node 'cpu-only'" in missing.stderr
        plan = hydraserve("plan", "--cluster", "--kube-namespace", cluster.namespace, "--name", "tiny",
                          "--model-uri", model, "--size-gb", "0.001", "--layers", "2", "--loaderd-port", str(port),
                          "--json", env=env)
        assert plan.returncode == 0, plan.stderr
        chosen = json.loads(plan.stdout)
        assert [s["node"] for s in chosen["stages"]] == [node]  # where its bytes already are
        assert chosen["stages"][0]["source"] != "s3"
