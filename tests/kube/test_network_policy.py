"""The NetworkPolicies against the pods they govern: the function's policy the interceptor
writes and the install's loaderd policy must select the labels our pods really carry (a
function pod as Knative creates it and once bound, a helper the interceptor creates, the
install's DaemonSet and control plane) on the ports really used, and admit nothing else.
Both pass the Kubernetes schemas (kubernetes-validate, strict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
from kubernetes.client import NetworkingV1Api

from hydraserve.activator.knative.policy import QUEUE_PROXY_PORTS
from hydraserve.contracts.pod import TRANSPORT_PORT
from hydraserve.provider.knative.kube import LOADERD_PORT
from hydraserve.provider.knative.service import RUNTIME_PORT
from tests.kube.conftest import Cluster, fake_only
from tests.kube.test_interceptor import STAGE_LABEL, Control, function_pod
from tests.manifests.test_install import INSTALL, docs_of
from tests.manifests.test_manifests import K8S_VERSION

CONTROL_NS = "hydraserve-system"  # the install's (manifests/install/kustomization.yaml)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's meaning (matchLabels and matchExpressions, ANDed)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"Exists": key in labels, "DoesNotExist": key not in labels,
              "In": labels.get(key) in values, "NotIn": labels.get(key) not in values}[op]
        if not ok:
            return False
    return True


def admits(policy: dict[str, Any], port: int, labels: dict[str, str], namespace: str) -> bool:
    """Whether ``policy`` lets a pod (its labels, its namespace) reach ``port`` of the pods it selects."""
    own_ns = policy["metadata"]["namespace"]
    for rule in policy["spec"].get("ingress") or []:
        if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
            continue
        if "from" not in rule:
            return True
        for peer in rule["from"]:
            ns_ok = (selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
                     if "namespaceSelector" in peer else namespace == own_ns)
            if ns_ok and selects(peer.get("podSelector") or {}, labels):
                return True
    return False


def template_labels(kind: str) -> dict[str, str]:
    [doc] = [d for d in docs_of(INSTALL) if d["kind"] == kind]
    return dict(doc["spec"]["template"]["metadata"]["labels"])


def container_of(kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs_of(INSTALL) if d["kind"] == kind]
    return dict(doc["spec"]["template"]["spec"]["containers"][0])


@fake_only
def test_the_functions_policy_selects_its_pods_and_admits_only_its_peers_and_the_control_plane(
        cluster: Cluster, tiny_llama_dir: Path) -> None:
    for name in ("gpu-a", "gpu-b"):
        cluster.add_node(name)
    with Control(cluster, tiny_llama_dir, pipeline=2):
        function_pod(cluster, "chat-00001-deployment-np")
        cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
        head = cluster.core.read_namespaced_pod("chat-00001-deployment-np", cluster.namespace)
        [helper] = cluster.pods(label_selector=f"{STAGE_LABEL}=1")
    listed = NetworkingV1Api(cluster.core.api_client).list_namespaced_network_policy(cluster.namespace).items
    [policy] = [cluster.core.api_client.sanitize_for_serialization(p) for p in listed]
    kubernetes_validate.validate(policy, K8S_VERSION, strict=True)
    ns, pods = cluster.namespace, [head.metadata.labels, helper.metadata.labels]
    assert all(selects(policy["spec"]["podSelector"], labels) for labels in pods)
    vllm_picked = 41234  # gloo's and ZeroMQ's ports: vLLM picks them at start, beside the store's
    assert all(admits(policy, port, a, ns) for a in pods for port in (TRANSPORT_PORT, vllm_picked))  # stages link
    other = {**head.metadata.labels, "hydraserve.dev/function": "other"}
    for stranger in (other, {"app": "x"}):
        assert not any(admits(policy, port, stranger, ns) for port in (TRANSPORT_PORT, vllm_picked, RUNTIME_PORT))
    interceptor = template_labels("Deployment")
    assert admits(policy, RUNTIME_PORT, interceptor, CONTROL_NS)
    assert not admits(policy, RUNTIME_PORT, interceptor, "elsewhere")
    assert all(admits(policy, port, {}, "knative-serving") for port in QUEUE_PROXY_PORTS)  # Knative's, untouched
    ports = {p.container_port for p in helper.spec.containers[0].ports}
    assert ports == {RUNTIME_PORT, TRANSPORT_PORT}  # every port a helper opens is governed


@fake_only
def test_the_installs_loaderd_policy_admits_workers_peers_and_the_control_plane(
        cluster: Cluster, tiny_llama_dir: Path) -> None:
    [policy] = [d for d in docs_of(INSTALL) if d["kind"] == "NetworkPolicy"]
    policy = {**policy, "metadata": {**policy["metadata"], "namespace": CONTROL_NS}}
    loaderd = template_labels("DaemonSet")
    assert selects(policy["spec"]["podSelector"], loaderd)
    daemon = container_of("DaemonSet")
    assert f"--port={LOADERD_PORT}" in daemon["args"] and daemon["ports"][0]["containerPort"] == LOADERD_PORT
    assert f"--loaderd-port={LOADERD_PORT}" in container_of("Deployment")["args"]
    for name in ("gpu-a", "gpu-b"):
        cluster.add_node(name)
    with Control(cluster, tiny_llama_dir, pipeline=2):
        created = function_pod(cluster, "chat-00001-deployment-ld")["metadata"]["labels"]  # before any binding
        cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
        [helper] = cluster.pods(label_selector=f"{STAGE_LABEL}=1")
    for labels, ns in ((created, cluster.namespace), (helper.metadata.labels, "team-b"), (loaderd, CONTROL_NS),
                       (template_labels("Deployment"), CONTROL_NS)):
        assert admits(policy, LOADERD_PORT, labels, ns), labels
    assert not admits(policy, LOADERD_PORT, {"app": "x"}, cluster.namespace)
    assert not admits(policy, LOADERD_PORT, loaderd, "elsewhere")  # a look-alike in another namespace
