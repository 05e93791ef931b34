"""The pod side, end to end on the fake API server: the interceptor binds a function pod with
its role; a process plays its kubelet (hydraserve/testing/fake_kubelet.py): the revision template's own
command, environment (the worker Secret's scoped loaderd token included) and Downward API
annotations file. The worker learns its role from that file, loads its weights from the node's
real loaderd with a heartbeat lease, turns /readyz true, serves a completion; the interceptor
records its start-up in the pod's timeline (the segments it mapped are all in the one
directory of loaderd its pod mounts: its model's); deleting the pod leaves no lease behind."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import requests

from hydraserve.contracts.pod import ROLE_ANNOTATION, TIMELINE_ANNOTATION
from hydraserve.contracts.timeline import Timeline
from hydraserve.provider.knative.service import LOADERD_HOST_DIR, loaderd_model_dir
from hydraserve.testing.fake_kubelet import ProcessKubelet
from tests.kube.conftest import Cluster, fake_only
from tests.kube.test_interceptor import Control, bound_node, function_pod, node_with_loaderd

POD_IP = "127.0.0.5"  # a loopback address standing in for the pod's IP


@fake_only
def test_a_function_pod_learns_its_role_loads_through_loaderd_and_serves(
        cluster: Cluster, tiny_llama_dir: Path, s3_server: Any, shm_guard: str, tmp_path: Path) -> None:
    with node_with_loaderd(cluster, shm_guard, tiny_llama_dir, s3_server, tmp_path) as (daemon, model, port):
        cluster.core.create_namespaced_secret(cluster.namespace, {
            "metadata": {"name": "hydraserve-s3"}, "stringData": s3_server.client_env()})
        loader = daemon.client()
        with Control(cluster, tiny_llama_dir, loaderd_port=port, s3_endpoint_url=s3_server.endpoint_url) as ctl:
            function_pod(cluster, "chat-00001-deployment-run", model=model)
            cluster.wait_for("the pod bound", lambda: bound_node(cluster, "chat-00001-deployment-run"))
            pod = cluster.core.read_namespaced_pod("chat-00001-deployment-run", cluster.namespace)
            assert json.loads(pod.metadata.annotations[ROLE_ANNOTATION])["loaderd_lease"] == "heartbeat"
            kubelet = ProcessKubelet(cluster.core, cluster.namespace, "chat-00001-deployment-run", POD_IP, tmp_path)
            kubelet.start()
            try:
                kubelet.wait_ready()
                done = requests.post(f"http://{POD_IP}:8080/v1/completions", timeout=60,
                                     json={"model": "chat", "prompt": "Hello", "max_tokens": 4})
                assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
                segments = loader.status().segments
                assert segments  # the weights came through the node's loaderd, which keeps them
                # ... all from the one directory the pod mounts (this loaderd's root is /dev/shm,
                # the node's is LOADERD_HOST_DIR: the same directory below either)
                bound = cluster.core.read_namespaced_pod("chat-00001-deployment-run", cluster.namespace)
                [mounted] = [v.host_path.path for v in bound.spec.volumes if v.host_path]
                assert mounted == loaderd_model_dir(model)
                assert {os.path.relpath(os.path.dirname(s.path), "/dev/shm") for s in segments} == {
                    os.path.relpath(mounted, LOADERD_HOST_DIR)}
                cluster.wait_for("the timeline recorded", lambda: TIMELINE_ANNOTATION in (cluster.core.read_namespaced_pod(
                    "chat-00001-deployment-run", cluster.namespace).metadata.annotations or {}), timeout_s=30)
                raw = cluster.core.read_namespaced_pod("chat-00001-deployment-run", cluster.namespace) \
                    .metadata.annotations[TIMELINE_ANNOTATION]
                timeline = Timeline.model_validate_json(raw)
                attached = timeline.first("weights_attached")
                assert attached is not None and attached.detail["via"] == "loaderd"  # not S3 directly
                for event in ("pod_pending", "plan_decided", "prefetch_started", "http_listening", "engine_ready",
                              "instance_ready"):
                    assert timeline.first(event) is not None, event
                cluster.core.delete_namespaced_pod("chat-00001-deployment-run", cluster.namespace)
                cluster.wait_for("the plan released", lambda: ctl.active_plans() == 0)
            finally:
                code = kubelet.stop()  # the kubelet stops a deleted pod's container: SIGTERM
            assert code == 0, kubelet.process.log_tail(40) if kubelet.process else ""
        assert sum(s.refcount for s in loader.status().segments) == 0  # nothing pinned by a gone pod
        loader.close()


@fake_only
def test_a_pipeline_group_of_pods_serves_then_consolidates_into_the_function_pod(
        cluster: Cluster, tiny_llama_dir: Path, s3_server: Any, shm_guard: str, tmp_path: Path) -> None:
    """p = 2 over two nodes, one with a loaderd and one without (its stage reads S3 itself): the
    helper pod and the function pod link through their stages' Service names, the group serves,
    the head grows into the whole model, and the interceptor deletes the helper."""
    with node_with_loaderd(cluster, shm_guard, tiny_llama_dir, s3_server, tmp_path) as (_daemon, model, port):
        cluster.add_node("gpu-plain")
        cluster.core.create_namespaced_secret(cluster.namespace, {
            "metadata": {"name": "hydraserve-s3"}, "stringData": s3_server.client_env()})
        with Control(cluster, tiny_llama_dir, pipeline=2, loaderd_port=port,
                     s3_endpoint_url=s3_server.endpoint_url) as ctl:
            function_pod(cluster, "chat-00001-deployment-grp", model=model)
            cluster.wait_for("the helper", lambda: cluster.pods(label_selector="hydraserve.dev/stage=1"))
            [helper] = cluster.pods(label_selector="hydraserve.dev/stage=1")
            pods = [ProcessKubelet(cluster.core, cluster.namespace, "chat-00001-deployment-grp", POD_IP, tmp_path),
                    ProcessKubelet(cluster.core, cluster.namespace, helper.metadata.name, "127.0.0.6", tmp_path)]
            for kubelet in pods:
                kubelet.place()
            try:
                for kubelet in pods:
                    kubelet.start()
                for kubelet in pods:
                    kubelet.wait_ready()
                cluster.wait_for("the group to serve", lambda: ctl.interceptor.groups(), timeout_s=60)
                done = requests.post(f"http://{POD_IP}:8080/v1/completions", timeout=60,
                                     json={"model": "chat", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
                assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
                cluster.wait_for("the helper deleted after consolidation", lambda: not cluster.pods(
                    label_selector="hydraserve.dev/stage=1"), timeout_s=90)
                assert pods[1].stop() is not None  # its kubelet stops the deleted pod's container
                again = requests.post(f"http://{POD_IP}:8080/v1/completions", timeout=60,
                                      json={"model": "chat", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
                assert again.status_code == 200  # the whole model on its own: the same greedy tokens
                assert again.json()["choices"][0]["token_ids"] == done.json()["choices"][0]["token_ids"]
            finally:
                for kubelet in pods:
                    kubelet.stop()
