"""The install's RBAC (manifests/install/rbac.yaml, manifests/function-namespace) against what
the control plane really does, and where: the interceptor and its leader election run on the
fake API server as their own user, through a pipeline group's whole life (bind, helpers, stage
Services, worker Secret and NetworkPolicy, an invalid pod's Event, a lost node, a deleted pod),
with a function pod in a namespace it does not serve. Every cluster-wide request must be allowed
by what a ClusterRoleBinding grants, every namespaced one by that or what the install's and a
function namespace's RoleBindings grant; nothing is done in a namespace not served, and nothing
is granted that was not used at that scope."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kubernetes import config
from kubernetes.client import CoordinationV1Api, CoreV1Api

from hydraserve.activator.knative.leader import LeaderElection
from hydraserve.activator.knative.pods import MANAGED_BY, MANAGED_BY_LABEL
from tests.kube.conftest import Cluster, fake_only
from tests.kube.test_interceptor import STAGE_LABEL, Control, function_pod

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
VERBS = {"GET": "get", "LIST": "list", "WATCH": "watch", "POST": "create", "PUT": "update", "PATCH": "patch",
         "DELETE": "delete"}
GROUPS = {"leases": "coordination.k8s.io", "networkpolicies": "networking.k8s.io"}
Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


def _docs(folder: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / folder / "rbac.yaml").read_text()) if d]


def bound(binding_kind: str, folder: str) -> set[Rule]:
    """What the interceptor's ServiceAccount gets from the ``binding_kind`` objects in ``folder``."""
    roles = {(d["kind"], d["metadata"]["name"]): d for d in _docs("install") if d["kind"] in ("ClusterRole", "Role")}
    out: set[Rule] = set()
    for binding in (d for d in _docs(folder) if d["kind"] == binding_kind):
        if not any(s["name"] == "hydraserve-interceptor" for s in binding["subjects"]):
            continue
        for rule in roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]["rules"]:
            out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def rule_of(what: str) -> Rule:
    verb, resource = what.split(" ")
    return GROUPS.get(resource, ""), resource, VERBS[verb]


@fake_only
def test_the_interceptors_role_allows_exactly_what_it_does_where_it_does_it(cluster: Cluster,
                                                                             tiny_llama_dir: Path) -> None:
    assert cluster.fake is not None
    for name in ("gpu-a", "gpu-b"):
        cluster.add_node(name)
    as_interceptor = CoreV1Api(config.new_client_from_config_dict(cluster.fake.kubeconfig(user="interceptor")))
    mine = Cluster(as_interceptor, cluster.namespace, cluster.fake)
    election = LeaderElection(CoordinationV1Api(as_interceptor.api_client), cluster.namespace, "hs", "me")
    assert election.try_acquire() and election.try_acquire()
    cluster.core.create_namespaced_secret(cluster.namespace, {  # ours, from before the function's model changed
        "metadata": {"name": "chat-hydraserve-worker", "annotations": {"hydraserve.dev/model": "s3://old/model"},
                     "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
        "stringData": {"loaderd-token": "stale"}})
    with Control(mine, tiny_llama_dir, pipeline=2, namespaces=frozenset({cluster.namespace})) as ctl:
        function_pod(Cluster(cluster.core, "not-served", cluster.fake), "chat-00001-deployment-x")
        function_pod(cluster, "bad-00001-deployment-c", function="bad", annotations={"hydraserve.dev/model": ""})
        function_pod(cluster, "other-00001-deployment-b", function="other")  # its worker Secret is new
        cluster.wait_for("its helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
        cluster.core.delete_namespaced_pod("other-00001-deployment-b", cluster.namespace)
        cluster.wait_for("its pods gone", lambda: len(cluster.pods()) == 1)
        function_pod(cluster, "chat-00001-deployment-a")
        cluster.wait_for("the helper", lambda: cluster.pods(label_selector=f"{STAGE_LABEL}=1"))
        [helper] = cluster.pods(label_selector=f"{STAGE_LABEL}=1")
        cluster.run_pod("chat-00001-deployment-a")
        cluster.run_pod(helper.metadata.name)
        cluster.wait_for("the group to serve", lambda: ctl.interceptor.groups())
        cluster.set_node_ready(helper.spec.node_name, False)  # its groups fail: pods deleted
        ctl.interceptor.refresh_nodes()
        cluster.wait_for("the pods deleted", lambda: len(cluster.pods()) == 1)
    election.release()
    assert cluster.core.read_namespaced_pod("chat-00001-deployment-x", "not-served").spec.node_name is None
    assert cluster.core.list_namespaced_event(cluster.namespace).items  # the invalid pod's
    done = cluster.fake.handler.scoped_by_user["interceptor"]
    used_cluster_wide = {rule_of(what) for what, ns in done if ns is None}
    used_in_namespace = {rule_of(what) for what, ns in done if ns is not None}
    assert {ns for _, ns in done if ns is not None} == {cluster.namespace}, "a namespace it does not serve"
    cluster_wide = bound("ClusterRoleBinding", "install")
    in_namespace = bound("RoleBinding", "install") | bound("RoleBinding", "function-namespace")
    assert used_cluster_wide - cluster_wide == set(), "cluster-wide requests the RBAC would refuse"
    assert used_in_namespace - (cluster_wide | in_namespace) == set(), "namespaced requests the RBAC would refuse"
    assert cluster_wide - used_cluster_wide == set(), "cluster-wide rights never used cluster-wide"
    assert in_namespace - used_in_namespace == set(), "namespaced rights never used"
