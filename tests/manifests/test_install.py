"""manifests/install (the fast path's install) and manifests/examples against references no one
here wrote: every built-in object against the Kubernetes schemas (kubernetes-validate, strict),
the example function against Knative Serving's rules under the install's cluster settings, the
Eventing objects against Knative Eventing's v1 API fields; and against our own code: every
container's arguments parse with the real `hydraserve` command line, the names each object
refers to exist, the example function is exactly what `kn hydra create` prints."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hydraserve.cli import build_parser
from hydraserve.contracts import events
from hydraserve.provider.knative.service import LOADERD_HOST_DIR

from .test_kn_hydra import kn_hydra, rules
from .test_manifests import K8S_VERSION, ROOT

INSTALL = ROOT / "install"
FUNCTION_NAMESPACE = ROOT / "function-namespace"  # applied in each function namespace
EXAMPLES = ROOT / "examples"
ISO_DURATION = re.compile(r"^PT(\d+H)?(\d+M)?(\d+(\.\d+)?S)?$")


def docs_of(folder: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    out = []
    for resource in kustomization["resources"]:
        out += [d for d in yaml.safe_load_all((folder / resource).read_text()) if d]
    return out


def builtin(doc: dict[str, Any]) -> bool:
    return "knative.dev" not in doc["apiVersion"]


@pytest.mark.parametrize("doc", [d for d in docs_of(INSTALL) + docs_of(FUNCTION_NAMESPACE) if builtin(d)],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_install_object_passes_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_container_runs_a_command_our_cli_accepts() -> None:
    parser = build_parser()
    checked = 0
    for doc in docs_of(INSTALL):
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        for c in containers(doc):
            if "args" not in c:
                continue
            args = [re.sub(r"\$\((\w+)\)", lambda m: "12345" if "BYTES" in m.group(1) else "x", a) for a in c["args"]]
            parsed = parser.parse_args(args)  # SystemExit (a failed test) on an unknown flag
            assert parsed.func is not None
            checked += 1
    assert checked == 2  # loaderd and the interceptor


def test_names_referred_to_exist_and_loaderd_shares_the_functions_host_directory() -> None:
    docs = docs_of(INSTALL)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    external_secrets = {"hydraserve-tokens", "hydraserve-s3"}  # created by the operator (kustomization.yaml)
    for doc in docs:
        if doc["kind"] not in ("Deployment", "DaemonSet"):
            continue
        spec = doc["spec"]["template"]["spec"]
        assert ("ServiceAccount", spec["serviceAccountName"]) in names
        for c in containers(doc):
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                else:
                    assert source["secretRef"]["name"] in external_secrets
            for env in c.get("env", []):
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in external_secrets
    [daemonset] = [d for d in docs if d["kind"] == "DaemonSet"]
    [segments] = [v for v in daemonset["spec"]["template"]["spec"]["volumes"] if v["name"] == "segments"]
    assert segments["hostPath"]["path"] == LOADERD_HOST_DIR
    assert f"--shm-dir={LOADERD_HOST_DIR}" in daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
    for binding in (d for d in docs + docs_of(FUNCTION_NAMESPACE) if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"]) in names
        for subject in binding["subjects"]:
            assert ("ServiceAccount", subject["name"]) in names and subject["namespace"] == "hydraserve-system"


def test_the_example_function_is_what_kn_hydra_prints_and_knative_admits_it() -> None:
    done = kn_hydra("create", "chat", "--model", "s3://models/tiny-chat", "--gpu", "0", "--cpu", "1",
                    "--memory", "4Gi", "--dry-run", "-o", "yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (EXAMPLES / "function.yaml").read_text()
    [function] = [d for d in docs_of(EXAMPLES) if d["metadata"]["name"] == "chat"]
    assert rules(function) == []


DELIVERY = {"deadLetterSink", "retry", "backoffPolicy", "backoffDelay", "timeout", "retryAfterMax"}


def eventing_violations(doc: dict[str, Any], services: set[str]) -> list[str]:
    """Knative Eventing v1's Broker and Trigger fields (eventing.knative.dev/v1 API reference)."""
    out = []
    spec = doc.get("spec") or {}
    if doc["kind"] == "Broker":
        out += [f"Broker spec.{k}: unknown" for k in set(spec) - {"config", "delivery"}]
    else:
        out += [f"Trigger spec.{k}: unknown" for k in set(spec) - {"broker", "filter", "filters", "subscriber",
                                                                   "delivery"}]
        if not spec.get("broker"):
            out.append("Trigger spec.broker: required")
        ref = (spec.get("subscriber") or {}).get("ref") or {}
        if ref.get("kind") != "Service" or ref.get("name") not in services:
            out.append(f"Trigger subscriber {ref}: not a Service defined here")
    delivery = spec.get("delivery") or {}
    out += [f"delivery.{k}: unknown" for k in set(delivery) - DELIVERY]
    if delivery.get("backoffPolicy") not in (None, "linear", "exponential"):
        out.append(f"delivery.backoffPolicy {delivery['backoffPolicy']}")
    for key in ("backoffDelay", "timeout"):
        if key in delivery and not ISO_DURATION.match(delivery[key]):
            out.append(f"delivery.{key} {delivery[key]}: not an ISO 8601 duration")
    sink = (delivery.get("deadLetterSink") or {}).get("ref")
    if sink and sink.get("name") not in services:
        out.append(f"deadLetterSink {sink}: not a Service defined here")
    return out


def test_the_eventing_example_wires_the_functions_event_types() -> None:
    docs = docs_of(EXAMPLES)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    eventing = [d for d in docs if d["apiVersion"] == "eventing.knative.dev/v1"]
    assert {d["kind"] for d in eventing} == {"Broker", "Trigger"}
    for doc in eventing:
        assert eventing_violations(doc, services) == [], doc["metadata"]["name"]
    types = {d["metadata"]["name"]: d["spec"]["filter"]["attributes"]["type"] for d in eventing if d["kind"] == "Trigger"}
    assert types == {"chat-requests": events.CHAT_REQUEST, "chat-replies": events.CHAT_RESPONSE}
    broken = {"kind": "Trigger", "spec": {"subscriber": {"ref": {"kind": "Service", "name": "nope"}},
                                          "delivery": {"backoffDelay": "2s", "backoffPolicy": "random"}}}
    assert len(eventing_violations(broken, services)) == 4  # the check could fail
    for doc in (d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] != "chat"):
        assert rules(doc) == []
