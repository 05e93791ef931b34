"""A function's NetworkPolicy, which the interceptor writes into the function's namespace with
its worker Secret: the ports of its pods that we own are reachable only from what needs them.

- any port, from pods of the same function: its groups' stages link there (vLLM's pipeline
  parallelism: torch.distributed's store on ``TRANSPORT_PORT``, then gloo's and ZeroMQ's
  connections on ports vLLM picks at start). These links are not authenticated: this rule is
  what keeps another function's pods, or any other pod, from opening one;
- the worker's HTTP port (``RUNTIME_PORT``): from the control plane (readiness, timelines).
  Knative's queue-proxy reaches it over the pod's loopback, which no policy governs;
- Knative's queue-proxy ports stay as open as they were: its activator, its autoscaler and the
  ingress gateway (whose namespace differs by install) reach them; restricting those is a
  Knative install's own policy.
Created once and never replaced (an operator may tighten it). loaderd's side is the install's
(manifests/install/network-policy.yaml).
"""

from __future__ import annotations

from typing import Any

from kubernetes.client import NetworkingV1Api

from hydraserve.provider.knative.kube import create_or_keep
from hydraserve.provider.knative.service import FUNCTION_LABEL, RUNTIME_PORT

CONTROL_PLANE_LABELS = {"app.kubernetes.io/name": "hydraserve-interceptor"}  # manifests/install/control-plane.yaml
QUEUE_PROXY_PORTS = (8012, 8013, 9090, 9091)  # serving (http, tls), autoscaler metrics, user metrics
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every namespace by the API server


def policy_name(function: str) -> str:
    return f"{function}-hydraserve"


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def function_network_policy(namespace: str, function: str, control_namespace: str) -> dict[str, Any]:
    """The networking.k8s.io/v1 NetworkPolicy of one function's pods (function and helper pods)."""
    own = {"matchLabels": {FUNCTION_LABEL: function}}
    control_plane = {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: control_namespace}},
                     "podSelector": {"matchLabels": dict(CONTROL_PLANE_LABELS)}}
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": policy_name(function), "namespace": namespace,
                     "labels": {FUNCTION_LABEL: function, "app.kubernetes.io/part-of": "hydraserve"}},
        "spec": {"podSelector": own, "policyTypes": ["Ingress"], "ingress": [
            {"from": [{"podSelector": own}]},  # every port: vLLM's group links are not all on TRANSPORT_PORT
            {"ports": _tcp(RUNTIME_PORT), "from": [control_plane]},
            {"ports": _tcp(*QUEUE_PROXY_PORTS)},
        ]},
    }


def ensure_network_policy(networking: NetworkingV1Api, namespace: str, function: str, control_namespace: str) -> None:
    """Create the function's NetworkPolicy unless it exists (HydraError if the API refuses)."""
    body = function_network_policy(namespace, function, control_namespace)
    create_or_keep(networking.create_namespaced_network_policy, namespace, body,
                   f"networkpolicy {body['metadata']['name']}")
