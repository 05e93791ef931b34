"""The Kubernetes API, as the interceptor, `kn hydra` and `loaderctl --node` use it (the
official client).

One place for the calls whose details bite: the pod binding (kubernetes-client/python #547,
#825: the server answers a Status that does not deserialize into V1Binding, so the call is made
with ``_preload_content=False``), create-or-keep on 409 AlreadyExists, and how a client is made
(in the cluster: the pod's service account; outside: KUBECONFIG or ~/.kube/config), and the
one Event per (pod, reason) the interceptor leaves where ``kubectl describe pod`` shows it.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

from kubernetes import client, config
from kubernetes.client import ApiClient, ApiException, CoreV1Api

from hydraserve.errors import ConflictError, HydraError, NotFoundError, PermanentError, TemporaryError

log = logging.getLogger(__name__)

LOADERD_SELECTOR = "app.kubernetes.io/name=hydraserve-loaderd"  # the DaemonSet's pods (manifests/install)
LOADERD_PORT = 7070  # the daemon's default port
EVENT_SOURCE = "hydraserve-scheduler"  # the component our Events name (the scheduler function pods ask for)


def api_client(kubeconfig: str | None = None, *, in_cluster: bool = True) -> ApiClient:
    """A client for the cluster this runs in (``in_cluster``: a pod's service account), or for
    ``kubeconfig`` (a path) when given or when not in a pod (then KUBECONFIG or ~/.kube/config)."""
    if kubeconfig is None and in_cluster:
        try:
            config.load_incluster_config()
            return ApiClient()
        except config.ConfigException:
            pass
    try:
        return config.new_client_from_config(config_file=kubeconfig)
    except (config.ConfigException, OSError) as exc:
        raise PermanentError(f"no cluster to talk to ({exc}): set KUBECONFIG or give --kubeconfig") from exc


def api_error(exc: ApiException, what: str) -> HydraError:
    """The HydraError an API answer stands for (404 not found, 409 conflict, else temporary)."""
    message = f"{what}: {exc.status} {exc.reason}"
    if exc.status == 404:
        return NotFoundError(message)
    if exc.status == 409:
        return ConflictError(message)
    return TemporaryError(message, retry_after_s=1.0)


def bind_pod(core: CoreV1Api, namespace: str, pod: str, node: str, annotations: dict[str, str]) -> None:
    """Bind ``pod`` to ``node``; the Binding's annotations land on the pod in the same write."""
    body = client.V1Binding(metadata=client.V1ObjectMeta(name=pod, annotations=annotations),
                            target=client.V1ObjectReference(api_version="v1", kind="Node", name=node))
    try:
        core.create_namespaced_pod_binding(pod, namespace, body, _preload_content=False)
    except ApiException as exc:
        raise api_error(exc, f"binding pod {namespace}/{pod} to {node}") from exc


def create_or_keep(create: Any, namespace: str, body: dict[str, Any], what: str) -> bool:
    """Create an object; one that exists already (a retry, a restart) is kept. True if created."""
    try:
        create(namespace, body)
        return True
    except ApiException as exc:
        if exc.status == 409:
            log.info("%s exists already: kept", what)
            return False
        raise api_error(exc, f"creating {what}") from exc


def pod_event(core: CoreV1Api, pod: dict[str, Any], reason: str, message: str) -> None:
    """A Warning Event on ``pod`` (``kubectl describe`` shows it), one per (pod, reason): its
    name is fixed, so a retry or another leader keeps the one there instead of adding more."""
    meta = pod["metadata"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason, "message": message[:1024],
            "metadata": {"name": f"{meta['name']}.{reason.lower()}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "source": {"component": EVENT_SOURCE}, "reportingComponent": EVENT_SOURCE,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1}
    try:
        create_or_keep(core.create_namespaced_event, meta["namespace"], body, f"event {reason} on {meta['name']}")
    except HydraError as exc:  # an event is a courtesy: the log has it too
        log.warning("%s", exc.message)


def delete_quietly(delete: Any, name: str, namespace: str, what: str) -> None:
    """Delete an object; one that is gone already is fine."""
    try:
        delete(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            log.warning("could not delete %s: %s %s", what, exc.status, exc.reason)


def daemon_urls(core: CoreV1Api, namespace: str, *, selector: str = LOADERD_SELECTOR,
                port: int = LOADERD_PORT) -> dict[str, str]:
    """Each node's running loaderd (the DaemonSet's pods): node name -> http://<pod IP>:<port>."""
    try:
        daemons = core.list_namespaced_pod(namespace, label_selector=selector).items
    except ApiException as exc:
        raise api_error(exc, "listing the loaderd pods") from exc
    return {p.spec.node_name: f"http://{p.status.pod_ip}:{port}" for p in daemons
            if p.spec.node_name and p.status and p.status.pod_ip and p.status.phase == "Running"}
