"""The interceptor against a Kubernetes API over real HTTP, driven by the official client: the
fake API server here (hydraserve/testing/fake_apiserver.py), a real cluster when KUBECONFIG is set.

Function pods are made from the Service `kn hydra create` writes (its revision template, plus
Knative's labels and queue-proxy container, as Knative's Deployment would make them). The
placement service is the real one, in process; the model description is a real tiny model's.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiException

from hydraserve.activator.knative.admission import ModelAllowlist
from hydraserve.activator.knative.interceptor import Interceptor, InterceptorOptions
from hydraserve.activator.knative.nodes import ClusterFeed
from hydraserve.activator.knative.pods import (
    MEMORY_ANNOTATION,
    ForeignSecretError,
    ensure_worker_secret,
)
from hydraserve.auth import NodeKeys, verify_worker_token, worker_token_claims
from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.plan import FunctionSpec
from hydraserve.contracts.pod import INSTANCE_LABEL, PLAN_ANNOTATION, ROLE_ANNOTATION, STAGE_LABEL
from hydraserve.contracts.timeline import Timeline
from hydraserve.errors import TemporaryError, UnauthorizedError
from hydraserve.provider.coldstart import ColdStartOptions
from hydraserve.provider.knative.kube import bind_pod
from hydraserve.provider.knative.service import (
    LOADERD_HOST_DIR,
    HydraService,
    knative_service,
    loaderd_model_dir,
)
from hydraserve.provider.model_spec import describe_model
from hydraserve.provider.service import PlacementService
from hydraserve.weights.model_files import LocalModelFiles
from tests.kube.conftest import Cluster, fake_only

MODEL = "s3://models/tiny"
LOADERD_TOKEN = "loaderd-admin-token-not-for-pods"


def function_pod(cluster: Cluster, name: str, *, function: str = "chat", annotations: dict[str, str] | None = None,
                 model: str = MODEL, host_path: str | None = None) -> dict[str, Any]:
    """A pod of the function's revision, as Knative's Deployment makes it (``host_path``: a
    revision someone wrote by hand, mounting that host path as its loaderd volume)."""
    service = knative_service(HydraService(name=function, namespace=cluster.namespace, model_uri=model))
    template = service["spec"]["template"]
    spec = json.loads(json.dumps(template["spec"]))
    if host_path is not None:
        [volume] = [v for v in spec["volumes"] if v["name"] == "loaderd"]
        volume["hostPath"]["path"] = host_path
    spec.pop("timeoutSeconds", None)
    spec.pop("containerConcurrency", None)
    for probe in ("readinessProbe", "livenessProbe"):  # Knative fills the user port in (rewriteUser*Probe)
        spec["containers"][0][probe]["httpGet"]["port"] = 8080
    spec["containers"].append({"name": "queue-proxy", "image": "gcr.io/knative-releases/queue",
                               "ports": [{"containerPort": 8012}]})
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": cluster.namespace,
                        "labels": {**template["metadata"]["labels"], "serving.knative.dev/service": function,
                                   "serving.knative.dev/revision": f"{function}-00001"},
                        "annotations": {**template["metadata"]["annotations"], **(annotations or {})}},
           "spec": spec}
    created = cluster.core.create_namespaced_pod(cluster.namespace, pod)
    return cluster.core.api_client.sanitize_for_serialization(created)


class Control:
    """The placement service and the interceptor, running against the cluster."""

    def __init__(self, cluster: Cluster, model_dir: Path, *, pipeline: int = 1, loaderd_port: int = 7070,
                 watching: bool = True, s3_endpoint_url: str | None = None,
                 namespaces: frozenset[str] | None = None, model_allowlist: ModelAllowlist | None = None) -> None:
        self.placement = PlacementService()
        self.feed = ClusterFeed(cluster.core, self.placement, loaderd_namespace=cluster.namespace,
                                loaderd_token=LOADERD_TOKEN, loaderd_port=loaderd_port)

        def describe(fn: FunctionConfig) -> FunctionSpec:
            spec = describe_model(fn, LocalModelFiles(model_dir))
            return spec.model_copy(update={"min_pipeline_size": pipeline, "max_pipeline_size": pipeline})

        self.interceptor = Interceptor(cluster.core, self.placement, self.feed, describe, InterceptorOptions(
            coldstart=ColdStartOptions(ready_timeout_s=60, watch_s=0.05, s3_endpoint_url=s3_endpoint_url), retry_s=0.2, resync_s=1,
            namespaces=namespaces, model_allowlist=model_allowlist))
        self._thread = threading.Thread(target=self.interceptor.run, daemon=True)
        self._watching = watching

    def __enter__(self) -> Control:
        if self._watching:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.interceptor.stop()
        if self._watching:
            self._thread.join(10)
        self.interceptor.wait_idle(10)

    def active_plans(self) -> int:
        return self.placement.status().active_plans

    def cold_starts(self, result: str) -> float:
        return self.interceptor.metrics.registry.get_sample_value(
            "hydraserve_interceptor_cold_starts_total", {"result": result}) or 0.0

    def reports(self, event: str) -> float:
        return self.placement.metrics.registry.get_sample_value(
            "hydraserve_placement_reports_total", {"event": event}) or 0.0


@pytest.fixture
def control(cluster: Cluster, tiny_llama_dir: Path) -> Iterator[Control]:
    if cluster.fake is not None:
        for name in ("gpu-a", "gpu-b"):
            cluster.add_node(name)
    with Control(cluster, tiny_llama_dir) as ctl:
        yield ctl


@pytest.fixture
def group_control(cluster: Cluster, tiny_llama_dir: Path) -> Iterator[Control]:
    if cluster.fake is not None:
        for name in ("gpu-a", "gpu-b"):
            cluster.add_node(name)
    with Control(cluster, tiny_llama_dir, pipeline=2) as ctl:
        yield ctl


def bound_node(cluster: Cluster, name: str) -> str | None:
    try:
        return cluster.core.read_namespaced_pod(name, cluster.namespace).spec.node_name
    except ApiException:
        return None


def test_pending_function_pod_is_bound_with_its_role_and_released_on_delete(cluster: Cluster, control: Control) -> None:
    function_pod(cluster, "chat-00001-deployment-abc")
    node = cluster.wait_for("the pod bound", lambda: bound_node(cluster, "chat-00001-deployment-abc"))
    pod = cluster.core.read_namespaced_pod("chat-00001-deployment-abc", cluster.namespace)
    role = json.loads(pod.metadata.annotations[ROLE_ANNOTATION])
    assert role["model_uri"] == MODEL and role["function"] == "chat" and role["instance_id"].startswith("chat-")
    assert "loaderd_token" not in role and LOADERD_TOKEN not in json.dumps(pod.metadata.annotations)
    plan = json.loads(pod.metadata.annotations[PLAN_ANNOTATION])
    assert plan["stages"][0]["node"] == node and plan["pipeline_size"] == 1
    assert float(pod.metadata.annotations[MEMORY_ANNOTATION]) == plan["stages"][0]["memory_gb"]
    assert pod.metadata.labels[STAGE_LABEL] == "0"
    assert control.active_plans() == 1
    secret = cluster.core.read_namespaced_secret("chat-hydraserve-worker", cluster.namespace)
    token = base64.b64decode(secret.data["loaderd-token"]).decode()
    scoped = verify_worker_token(NodeKeys.derive(LOADERD_TOKEN, node), token, time.time())
    assert scoped is not None and scoped.model_uri == MODEL and not scoped.admin  # its model, nothing more
    assert worker_token_claims(token)["nodes"] == [node]  # type: ignore[index]  # its plan's node only
    cluster.run_pod("chat-00001-deployment-abc")
    cluster.wait_for("the group to serve", lambda: control.interceptor.groups())
    assert control.cold_starts("serving") == 1
    assert control.interceptor.metrics.registry.get_sample_value("hydraserve_interceptor_groups") == 1
    cluster.core.delete_namespaced_pod("chat-00001-deployment-abc", cluster.namespace)
    cluster.wait_for("the plan released", lambda: control.active_plans() == 0 and not control.interceptor.groups())


def test_the_worker_secret_follows_its_functions_model(cluster: Cluster) -> None:
    """A token scoped to the function's model, written again (scoped to the new one) when the model
    changes, and left as it is while the model stays."""
    def token_model() -> str | None:
        data = cluster.core.read_namespaced_secret("chat-hydraserve-worker", cluster.namespace).data
        token = base64.b64decode(data["loaderd-token"]).decode()
        scoped = verify_worker_token(NodeKeys.derive(LOADERD_TOKEN, "gpu-a"), token, time.time())
        return scoped.model_uri if scoped is not None else None

    ensure_worker_secret(cluster.core, cluster.namespace, "chat", MODEL, LOADERD_TOKEN, ["gpu-a"])
    assert token_model() == MODEL
    version = cluster.core.read_namespaced_secret("chat-hydraserve-worker", cluster.namespace).metadata.resource_version
    ensure_worker_secret(cluster.core, cluster.namespace, "chat", MODEL, LOADERD_TOKEN, ["gpu-a"])
    assert cluster.core.read_namespaced_secret("chat-hydraserve-worker",
                                               cluster.namespace).metadata.resource_version == version
    ensure_worker_secret(cluster.core, cluster.namespace, "chat", "s3://models/other", LOADERD_TOKEN, ["gpu-a"])
    assert token_model() == "s3://models/other"


def test_the_worker_token_expires_names_its_nodes_and_is_renewed_well_before_expiry(cluster: Cluster) -> None:
    """The Secret's token is for the nodes asked (a node added is a new token), expires, and is
    written again once less than half its life is left; a renewal names only the nodes asked."""
    def claims() -> tuple[dict, str]:
        secret = cluster.core.read_namespaced_secret("chat-hydraserve-worker", cluster.namespace)
        token = base64.b64decode(secret.data["loaderd-token"]).decode()
        return worker_token_claims(token) or {}, secret.metadata.resource_version

    def ensure(nodes: list[str], now: float) -> None:
        ensure_worker_secret(cluster.core, cluster.namespace, "chat", MODEL, LOADERD_TOKEN, nodes, now=now, ttl_s=100)

    t0 = 1_800_000_000.0
    ensure(["gpu-a"], t0)
    first, version = claims()
    assert first["nodes"] == ["gpu-a"] and first["exp"] == t0 + 100
    ensure(["gpu-a"], t0 + 40)  # more than half left: kept
    assert claims()[1] == version
    ensure(["gpu-a", "gpu-b"], t0 + 40)  # a node not covered: a token for both
    both, _ = claims()
    assert both["nodes"] == ["gpu-a", "gpu-b"] and both["exp"] == t0 + 140
    ensure(["gpu-b"], t0 + 60)  # covered, not due: kept
    assert claims()[0] == both
    ensure(["gpu-b"], t0 + 91)  # less than half its life left: renewed, for the nodes asked only
    renewed, _ = claims()
    assert renewed["nodes"] == ["gpu-b"] and renewed["exp"] == t0 + 191
    token = base64.b64decode(cluster.core.read_namespaced_secret(
        "chat-hydraserve-worker", cluster.namespace).data["loaderd-token"]).decode()
    assert verify_worker_token(NodeKeys.derive(LOADERD_TOKEN, "gpu-b"), token, t0 + 190) is not None
    with pytest.raises(UnauthorizedError, match="expired"):
        verify_worker_token(NodeKeys.derive(LOADERD_TOKEN, "gpu-b"), token, t0 + 191)
    with pytest.raises(UnauthorizedError, match="not node gpu-a"):
        verify_worker_token(NodeKeys.derive(LOADERD_TOKEN, "gpu-a"), token, t0 + 100)


def test_a_secret_the_interceptor_did_not_write_is_never_overwritten(cluster: Cluster, control: Control) -> None:
    """Someone's own Secret under the worker Secret's name: left as it is, and the pod says why
    its workers have no token of ours (an Event); the cold start goes on (they read S3)."""
    cluster.core.create_namespaced_secret(cluster.namespace, {"metadata": {"name": "chat-hydraserve-worker"},
                                                              "stringData": {"loaderd-token": "users-own"}})
    with pytest.raises(ForeignSecretError):
        ensure_worker_secret(cluster.core, cluster.namespace, "chat", MODEL, LOADERD_TOKEN, ["gpu-a"])
    pod = function_pod(cluster, "chat-00001-deployment-fs")
    cluster.wait_for("the pod bound", lambda: bound_node(cluster, "chat-00001-deployment-fs"))
    data = cluster.core.read_namespaced_secret("chat-hydraserve-worker", cluster.namespace).data
    assert data == {"loaderd-token": base64.b64encode(b"users-own").decode()}
    events = cluster.core.list_namespaced_event(
        cluster.namespace, field_selector=f"involvedObject.name={pod['metadata']['name']}").items
    assert [e.reason for e in events] == ["WorkerSecretNotOurs"]


def test_pipeline_group_gets_helper_pods_owned_by_the_function_pod(cluster: Cluster, group_control: Control) -> None:
    head = function_pod(cluster, "chat-00001-deployment-grp")
    cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
    [helper] = cluster.pods(label_selector=f"{STAGE_LABEL}=1")
    pod = cluster.core.read_namespaced_pod("chat-00001-deployment-grp", cluster.namespace)
    plan = json.loads(pod.metadata.annotations[PLAN_ANNOTATION])
    assert plan["pipeline_size"] == 2
    assert pod.spec.node_name == plan["stages"][0]["node"] and helper.spec.node_name == plan["stages"][1]["node"]
    assert [(r.kind, r.uid) for r in helper.metadata.owner_references] == [("Pod", head["metadata"]["uid"])]
    env = {e.name: e for e in helper.spec.containers[0].env}
    assert json.loads(env["HYDRASERVE_STAGE"].value)["index"] == 1
    peers = json.loads(env["HYDRASERVE_PEERS"].value)
    assert len(peers) == 2 and all(p.endswith(f".{cluster.namespace}.svc:8090") for p in peers)
    assert not env["HYDRASERVE_LOADERD_TOKEN"].value  # never a token in a pod's spec: a file of the Secret
    assert env["HYDRASERVE_LOADERD_TOKEN_FILE"].value == "/etc/hydraserve/worker/loaderd-token"
    assert [v.secret.secret_name for v in helper.spec.volumes if v.secret] == ["chat-hydraserve-worker"]
    assert env["HYDRASERVE_HOST"].value == "0.0.0.0"
    probe = helper.spec.containers[0].liveness_probe.http_get  # a deadlocked stage is restarted too
    assert (probe.path, probe.port) == ("/livez", 8080)
    services = cluster.core.list_namespaced_service(cluster.namespace).items
    assert sorted(s.metadata.name.rsplit("-", 1)[1] for s in services) == ["s0", "s1"]
    assert all(s.spec.cluster_ip == "None" and s.spec.publish_not_ready_addresses for s in services)
    assert [p.split(".")[0] for p in peers] == sorted(s.metadata.name for s in services)
    instance = pod.metadata.labels[INSTANCE_LABEL]
    assert {s.spec.selector[INSTANCE_LABEL] for s in services} == {instance}
    cluster.run_pod("chat-00001-deployment-grp")
    cluster.run_pod(helper.metadata.name)
    cluster.wait_for("the group to serve", lambda: control_groups(group_control))
    cluster.core.delete_namespaced_pod("chat-00001-deployment-grp", cluster.namespace)
    cluster.wait_for("helpers and services gone", lambda: not cluster.pods() and not
                     cluster.core.list_namespaced_service(cluster.namespace).items)
    cluster.wait_for("the plan released", lambda: group_control.active_plans() == 0)


def test_a_groups_pods_mount_only_their_models_loaderd_directory(cluster: Cluster, group_control: Control) -> None:
    """Not the node's whole loaderd directory: a pod can map its own model's segments only."""
    function_pod(cluster, "chat-00001-deployment-mnt")
    cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
    [helper] = cluster.pods(label_selector=f"{STAGE_LABEL}=1")
    head = cluster.core.read_namespaced_pod("chat-00001-deployment-mnt", cluster.namespace)
    own = loaderd_model_dir(MODEL)
    assert own.startswith(LOADERD_HOST_DIR + "/hydraserve-model-") and own != loaderd_model_dir("s3://models/other")
    for pod in (head, helper):
        assert [(v.host_path.path, v.host_path.type) for v in pod.spec.volumes if v.host_path] == [(own, "Directory")]
        mounts = [m for m in pod.spec.containers[0].volume_mounts if m.name == "loaderd"]
        assert [(m.mount_path, m.read_only) for m in mounts] == [(own, True)]


@fake_only
@pytest.mark.parametrize("host_path", [LOADERD_HOST_DIR, "/run/hydraserve", "/",
                                       LOADERD_HOST_DIR + "/hydraserve-model-0123456789abcdef01234567",
                                       LOADERD_HOST_DIR + "/../loaderd"])
def test_a_pod_mounting_more_of_loaderd_than_its_model_is_refused_with_one_event(
        cluster: Cluster, control: Control, host_path: str) -> None:
    pod = function_pod(cluster, "chat-00001-deployment-wide", host_path=host_path)
    cluster.wait_for("the refusal", lambda: control.cold_starts("invalid") == 1)
    assert control.interceptor.wait_idle(10)
    events = cluster.core.list_namespaced_event(
        cluster.namespace, field_selector=f"involvedObject.name={pod['metadata']['name']}").items
    assert [(e.reason, e.type) for e in events] == [("InvalidFunctionPod", "Warning")]
    assert loaderd_model_dir(MODEL) in events[0].message
    assert bound_node(cluster, pod["metadata"]["name"]) is None and control.active_plans() == 0
    assert not cluster.core.list_namespaced_secret(cluster.namespace).items  # no token for it


@fake_only
def test_a_model_outside_its_namespaces_allowlist_gets_one_event_and_no_secret_or_prefetch(
        cluster: Cluster, tiny_llama_dir: Path, s3_server: Any, shm_guard: str, tmp_path: Path) -> None:
    assert cluster.fake is not None
    with node_with_loaderd(cluster, shm_guard, tiny_llama_dir, s3_server, tmp_path) as (daemon, model, port):
        allowlist = ModelAllowlist.parse(f"{cluster.namespace}=s3://kube-models/allowed,s3://models/x\n"
                                         "elsewhere=s3://kube-models")
        assert allowlist is not None and allowlist.allows("elsewhere", model)
        with Control(cluster, tiny_llama_dir, loaderd_port=port, s3_endpoint_url=s3_server.endpoint_url,
                     model_allowlist=allowlist) as ctl:
            pod = function_pod(cluster, "chat-00001-deployment-deny", model=model)
            cluster.wait_for("the refusal", lambda: ctl.cold_starts("invalid") == 1)
            handler = cluster.fake.handler
            lists = handler.counts.get("LIST pods", 0)
            cluster.wait_for("two more resyncs", lambda: handler.counts.get("LIST pods", 0) >= lists + 6, timeout_s=30)
            assert ctl.interceptor.wait_idle(10)
            events = cluster.core.list_namespaced_event(
                cluster.namespace, field_selector=f"involvedObject.name={pod['metadata']['name']}").items
            assert [(e.reason, e.type) for e in events] == [("InvalidFunctionPod", "Warning")]
            assert model in events[0].message and "allowlist" in events[0].message
            assert ctl.cold_starts("invalid") == 1 and ctl.active_plans() == 0
            assert bound_node(cluster, pod["metadata"]["name"]) is None
            assert not cluster.core.list_namespaced_secret(cluster.namespace).items  # no token, no Secret
            loader = daemon.client()
            assert loader.status().segments == []  # nothing prefetched for it
            loader.close()


def control_groups(control: Control) -> bool:
    return bool(control.interceptor.groups())


def test_deleting_the_function_pod_mid_cold_start_leaves_nothing(cluster: Cluster, group_control: Control) -> None:
    function_pod(cluster, "chat-00001-deployment-del")
    cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
    assert group_control.active_plans() == 1
    cluster.core.delete_namespaced_pod("chat-00001-deployment-del", cluster.namespace)  # before it is ready
    cluster.wait_for("every pod gone", lambda: not cluster.pods())
    cluster.wait_for("the plan freed", lambda: group_control.active_plans() == 0)
    cluster.wait_for("the interceptor to forget it", lambda: not group_control.interceptor.plans())
    assert group_control.cold_starts("deleted") == 1
    assert not cluster.core.list_namespaced_service(cluster.namespace).items


@fake_only
def test_restart_keeps_bound_pods_and_counts_their_memory(cluster: Cluster, tiny_llama_dir: Path) -> None:
    cluster.add_node("gpu-a")
    with Control(cluster, tiny_llama_dir) as first:
        function_pod(cluster, "chat-00001-deployment-one")
        cluster.wait_for("the pod bound", lambda: bound_node(cluster, "chat-00001-deployment-one"))
        cluster.run_pod("chat-00001-deployment-one")
        cluster.wait_for("the group to serve", lambda: control_groups(first))
    pod = cluster.core.read_namespaced_pod("chat-00001-deployment-one", cluster.namespace)
    given = float(pod.metadata.annotations[MEMORY_ANNOTATION])
    function_pod(cluster, "chat-00001-deployment-two")  # arrives while no interceptor runs
    assert cluster.fake is not None
    with Control(cluster, tiny_llama_dir) as second:
        cluster.wait_for("the new pod bound", lambda: bound_node(cluster, "chat-00001-deployment-two"))
        assert cluster.fake.handler.counts["POST pods/binding"] == 2  # the old pod was not bound again
        [node] = second.placement.status().nodes
        newer = float(cluster.core.read_namespaced_pod("chat-00001-deployment-two", cluster.namespace)
                      .metadata.annotations[MEMORY_ANNOTATION])
        assert node.gpu_free_gb[0] == pytest.approx(16.0 - given - newer, abs=1e-6)  # both pods counted


def test_a_binding_conflict_ends_the_cold_start_and_frees_its_plan(cluster: Cluster, tiny_llama_dir: Path) -> None:
    """A 409 from the binding (the pod was bound meanwhile, e.g. by an earlier incarnation)."""
    if cluster.fake is not None:
        cluster.add_node("gpu-a")
    with Control(cluster, tiny_llama_dir, watching=False) as ctl:  # the test feeds the event itself
        stale = function_pod(cluster, "chat-00001-deployment-409")
        node = ctl.interceptor.refresh_nodes()
        bind_pod(cluster.core, cluster.namespace, "chat-00001-deployment-409", sorted(node)[0], {})
        ctl.interceptor.observe("ADDED", stale)  # what a lagging watch would have said
        assert ctl.interceptor.wait_idle(20)
        assert ctl.reports("failed") == 1  # the plan was made, then freed
        assert ctl.cold_starts("conflict") == 1
        assert ctl.active_plans() == 0 and not ctl.interceptor.plans()
        assert bound_node(cluster, "chat-00001-deployment-409") == sorted(node)[0]
        assert not cluster.pods(label_selector=STAGE_LABEL)  # the pod was not labelled: no stage started


@fake_only
def test_a_lost_node_fails_its_groups_and_knative_gets_a_new_pod(cluster: Cluster, group_control: Control) -> None:
    function_pod(cluster, "chat-00001-deployment-node")
    cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
    [helper] = cluster.pods(label_selector=f"{STAGE_LABEL}=1")
    cluster.run_pod("chat-00001-deployment-node")
    cluster.run_pod(helper.metadata.name)
    cluster.wait_for("the group to serve", lambda: control_groups(group_control))
    cluster.set_node_ready(helper.spec.node_name, False)
    group_control.interceptor.refresh_nodes()
    cluster.wait_for("the function pod deleted (Knative makes another)", lambda: not cluster.pods())
    cluster.wait_for("the plan freed", lambda: group_control.active_plans() == 0)
    [status] = [n for n in group_control.placement.status().nodes if n.name == helper.spec.node_name]
    assert not status.schedulable


def loaderd_pod(cluster: Cluster, node: str) -> None:
    """The DaemonSet's pod on ``node`` (its daemon: a real loaderd on 127.0.0.1, or none)."""
    cluster.core.create_namespaced_pod(cluster.namespace, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"loaderd-{node}", "labels": {"app.kubernetes.io/name": "hydraserve-loaderd"}},
        "spec": {"nodeName": node, "containers": [{"name": "loaderd", "image": "x"}]}})
    cluster.run_pod(f"loaderd-{node}", ip="127.0.0.1")


@contextlib.contextmanager
def node_with_loaderd(cluster: Cluster, node: str, model_dir: Path, s3_server: Any, tmp_path: Path
                      ) -> Iterator[tuple[Any, str, int]]:
    """A node whose DaemonSet pod runs a real loaderd (on 127.0.0.1), and a model in S3: yields
    the daemon, the model's URI and the daemon's port. ``node`` names its segments too."""
    from hydraserve.loaderd.daemon import spawn_loaderd
    from hydraserve.processes import free_port

    s3_server.create_bucket("kube-models")
    model = s3_server.upload_dir(model_dir, "kube-models", "tiny")
    (tmp_path / "token").write_text(LOADERD_TOKEN)
    (tmp_path / "token").chmod(0o600)
    port = free_port()
    daemon = spawn_loaderd(port=port, node_name=node, budget_bytes=1 << 30, token=LOADERD_TOKEN,
                           token_file=tmp_path / "token", endpoint_url=s3_server.endpoint_url,
                           env=s3_server.client_env(), log_path=tmp_path / "loaderd.log")
    try:
        cluster.add_node(node)
        loaderd_pod(cluster, node)
        yield daemon, model, port
    finally:
        daemon.stop()


@fake_only
def test_the_chosen_nodes_loaderd_prefetches_and_its_residency_is_what_the_daemon_says(
        cluster: Cluster, tiny_llama_dir: Path, s3_server: Any, shm_guard: str, tmp_path: Path) -> None:

    with node_with_loaderd(cluster, shm_guard, tiny_llama_dir, s3_server, tmp_path) as (daemon, model, port):
        with Control(cluster, tiny_llama_dir, loaderd_port=port, s3_endpoint_url=s3_server.endpoint_url) as ctl:
            function_pod(cluster, "chat-00001-deployment-pf", model=model)
            cluster.wait_for("the pod bound", lambda: bound_node(cluster, "chat-00001-deployment-pf"))
            loader = daemon.client()
            cluster.wait_for("the prefetch done", lambda: any(
                m.model_uri == model and m.groups_complete for m in loader.status().models))
            role = json.loads(cluster.core.read_namespaced_pod("chat-00001-deployment-pf", cluster.namespace)
                              .metadata.annotations[ROLE_ANNOTATION])
            assert role["loaderd_url"] == daemon.url
            ctl.interceptor.refresh_nodes()
            [status] = ctl.placement.status().nodes
            assert status.resident_models == [model]  # as the daemon says
            daemon.stop()  # restarted or evicted: it holds nothing now
            ctl.interceptor.refresh_nodes()
            [status] = ctl.placement.status().nodes
            assert status.resident_models == []
            loader.close()


@fake_only
def test_an_unanswering_loaderd_skips_the_prefetch_and_the_pod_still_runs(cluster: Cluster, tiny_llama_dir: Path) -> None:
    cluster.add_node("gpu-a")
    loaderd_pod(cluster, "gpu-a")
    with Control(cluster, tiny_llama_dir, loaderd_port=1) as ctl:  # nothing listens on port 1
        function_pod(cluster, "chat-00001-deployment-ld")
        cluster.wait_for("the pod bound", lambda: bound_node(cluster, "chat-00001-deployment-ld"), timeout_s=30)
        role = json.loads(cluster.core.read_namespaced_pod("chat-00001-deployment-ld", cluster.namespace)
                          .metadata.annotations[ROLE_ANNOTATION])
        assert role["loaderd_url"] == "http://127.0.0.1:1"  # the worker tries it, then reads S3 itself
        assert ctl.active_plans() == 1


def test_a_pod_without_a_model_is_left_alone(cluster: Cluster, control: Control) -> None:
    pod = function_pod(cluster, "chat-00001-deployment-bad", annotations={"hydraserve.dev/model": ""})
    assert control.interceptor.wait_idle(10)
    cluster.wait_for("the interceptor to see it", lambda: control.interceptor.threads)
    assert control.interceptor.wait_idle(10)
    assert bound_node(cluster, pod["metadata"]["name"]) is None and control.active_plans() == 0


@fake_only
def test_an_invalid_pod_is_marked_with_one_event_however_many_resyncs(cluster: Cluster, control: Control) -> None:
    assert cluster.fake is not None
    pod = function_pod(cluster, "chat-00001-deployment-nomodel", annotations={"hydraserve.dev/model": ""})
    lists = cluster.fake.handler.counts.get("LIST pods", 0)
    cluster.wait_for("three resyncs", lambda: cluster.fake.handler.counts.get("LIST pods", 0) >= lists + 9,
                     timeout_s=30)
    events = cluster.core.list_namespaced_event(
        cluster.namespace, field_selector=f"involvedObject.name={pod['metadata']['name']}").items
    assert [(e.reason, e.type, e.involved_object.uid) for e in events] == [
        ("InvalidFunctionPod", "Warning", pod["metadata"]["uid"])]
    assert "hydraserve.dev/model" in events[0].message
    assert control.cold_starts("invalid") == 1  # found again at each resync, but not started (nor told) again


def test_retries_before_binding_back_off_exponentially_up_to_a_cap(cluster: Cluster, tiny_llama_dir: Path) -> None:
    if cluster.fake is not None:
        cluster.add_node("gpu-a")
    asked: list[float] = []

    def planner_down(request: object) -> None:
        asked.append(time.monotonic())
        raise TemporaryError("the planner is down")

    with Control(cluster, tiny_llama_dir, watching=False) as ctl:
        ctl.placement.plan = planner_down  # type: ignore[method-assign,assignment]
        ctl.interceptor.options.retry_s, ctl.interceptor.options.retry_max_s = 0.1, 0.8
        function_pod(cluster, "chat-00001-deployment-retry")
        ctl.interceptor.resync()
        cluster.wait_for("six attempts", lambda: len(asked) >= 6, timeout_s=30)
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    assert all(later >= 1.3 * earlier for earlier, later in itertools.pairwise(gaps[:4])), gaps
    assert 0.8 <= gaps[3] and all(0.8 <= g < 1.5 for g in gaps[3:5]), gaps  # capped
    assert ctl.cold_starts("failed_before_binding") == len(asked)


class FakeHead:
    """What the interceptor asks of a function pod's head over HTTP (/readyz, its timeline), on
    the pod IP the test gives the pod; ``consolidated`` is what /readyz says."""

    def __init__(self, ip: str) -> None:
        import http.server

        head = self
        self.consolidated = False

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = (json.dumps({"status": "ready", "consolidated": head.consolidated}) if self.path == "/readyz"
                        else Timeline().model_dump_json()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((ip, 8080), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@fake_only
@pytest.mark.parametrize("restart", [False, True], ids=["same-leader", "after-a-restart"])
def test_once_the_head_consolidates_the_partial_helper_goes(cluster: Cluster, tiny_llama_dir: Path,
                                                            restart: bool) -> None:
    for name in ("gpu-a", "gpu-b"):
        cluster.add_node(name)
    head = FakeHead("127.0.0.2")
    try:
        first = Control(cluster, tiny_llama_dir, pipeline=2).__enter__()
        function_pod(cluster, "chat-00001-deployment-con")
        cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
        [helper] = cluster.pods(label_selector=f"{STAGE_LABEL}=1")
        cluster.run_pod("chat-00001-deployment-con", ip="127.0.0.2")
        cluster.run_pod(helper.metadata.name, ip="127.0.0.3")
        cluster.wait_for("the group to serve", lambda: control_groups(first))
        assert json.loads(cluster.core.read_namespaced_pod("chat-00001-deployment-con", cluster.namespace)
                          .metadata.annotations[PLAN_ANNOTATION])["stages"][1]["full"] is False
        ctl = first
        if restart:
            first.__exit__()  # the serving group is left alone ...
            assert cluster.pods(label_selector=f"{STAGE_LABEL}=1")
            ctl = Control(cluster, tiny_llama_dir, pipeline=2).__enter__()  # ... and taken over
            cluster.wait_for("the group taken over", lambda: control_groups(ctl))
        head.consolidated = True
        cluster.wait_for("the partial helper deleted", lambda: not cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
        assert [p.metadata.name for p in cluster.pods()] == ["chat-00001-deployment-con"]
        services = [s.metadata.name for s in cluster.core.list_namespaced_service(cluster.namespace).items]
        assert len(services) == 1 and services[0].endswith("-s0")  # the helper's went with it
        ctl.__exit__()
    finally:
        head.close()


def test_a_pod_deleted_while_no_watch_ran_is_released_at_the_next_resync(cluster: Cluster, tiny_llama_dir: Path) -> None:
    if cluster.fake is not None:
        cluster.add_node("gpu-a")
    with Control(cluster, tiny_llama_dir, watching=False) as ctl:  # the test drives the reads itself
        function_pod(cluster, "chat-00001-deployment-gap")
        ctl.interceptor.resync()
        cluster.wait_for("the pod bound", lambda: bound_node(cluster, "chat-00001-deployment-gap"))
        cluster.run_pod("chat-00001-deployment-gap")
        cluster.wait_for("the group to serve", lambda: ctl.interceptor.groups())
        cluster.core.delete_namespaced_pod("chat-00001-deployment-gap", cluster.namespace)  # no event seen
        assert ctl.active_plans() == 1
        ctl.interceptor.resync()
        cluster.wait_for("the plan released", lambda: ctl.active_plans() == 0 and not ctl.interceptor.groups())
