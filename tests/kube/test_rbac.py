"""The install's RBAC (manifests/install/rbac.yaml) against what the control plane really does:
the interceptor and its leader election run on the fake API server as their own user, through
a pipeline group's whole life (bind, helpers, stage Services, worker Secret, a lost node, a
deleted pod); every request they made must be allowed by the ClusterRole and Role the install
binds to their ServiceAccount, and nothing more is granted than was used."""

from __future__ import annotations

from pathlib import Path

import yaml
from kubernetes import config
from kubernetes.client import CoordinationV1Api, CoreV1Api

from hydraserve.provider.knative.leader import LeaderElection
from tests.kube.conftest import Cluster, fake_only
from tests.kube.test_interceptor import STAGE_LABEL, Control, function_pod

RBAC = Path(__file__).resolve().parents[2] / "manifests" / "install" / "rbac.yaml"
VERBS = {"GET": "get", "LIST": "list", "WATCH": "watch", "POST": "create", "PUT": "update", "PATCH": "patch",
         "DELETE": "delete"}
GROUPS = {"leases": "coordination.k8s.io"}


def granted() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) the interceptor's ServiceAccount may do."""
    out = set()
    for doc in yaml.safe_load_all(RBAC.read_text()):
        if doc["kind"] in ("ClusterRole", "Role") and doc["metadata"]["name"] in (
                "hydraserve-interceptor", "hydraserve-leader-election"):
            for rule in doc["rules"]:
                out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


@fake_only
def test_the_interceptors_role_allows_exactly_what_it_does(cluster: Cluster, tiny_llama_dir: Path) -> None:
    assert cluster.fake is not None
    for name in ("gpu-a", "gpu-b"):
        cluster.add_node(name)
    as_interceptor = CoreV1Api(config.new_client_from_config_dict(cluster.fake.kubeconfig(user="interceptor")))
    mine = Cluster(as_interceptor, cluster.namespace, cluster.fake)
    election = LeaderElection(CoordinationV1Api(as_interceptor.api_client), cluster.namespace, "hs", "me")
    assert election.try_acquire() and election.try_acquire()
    cluster.core.create_namespaced_secret(cluster.namespace, {  # from before the function's model changed
        "metadata": {"name": "chat-hydraserve-worker", "annotations": {"hydraserve.dev/model": "s3://old/model"}},
        "stringData": {"loaderd-token": "stale"}})
    with Control(mine, tiny_llama_dir, pipeline=2) as ctl:
        function_pod(cluster, "other-00001-deployment-b", function="other")  # its worker Secret is new
        cluster.wait_for("its helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
        cluster.core.delete_namespaced_pod("other-00001-deployment-b", cluster.namespace)
        cluster.wait_for("its pods gone", lambda: not cluster.pods())
        function_pod(cluster, "chat-00001-deployment-a")
        cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
        [helper] = cluster.pods(label_selector=f"{STAGE_LABEL}=1")
        cluster.run_pod("chat-00001-deployment-a")
        cluster.run_pod(helper.metadata.name)
        cluster.wait_for("the group to serve", lambda: ctl.interceptor.groups())
        cluster.set_node_ready(helper.spec.node_name, False)  # its groups fail: pods deleted
        ctl.interceptor.refresh_nodes()
        cluster.wait_for("the pods deleted", lambda: not cluster.pods())
    election.release()
    used = set()
    for what in cluster.fake.handler.requests_by_user["interceptor"]:
        verb, resource = what.split(" ")
        used.add((GROUPS.get(resource, ""), resource, VERBS[verb]))
    allowed = granted()
    assert used - allowed == set(), "requests the install's RBAC would refuse"
    assert allowed - used == set(), "rights granted but never used"
