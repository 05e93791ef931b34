"""`kn hydra create --dry-run -o yaml` (the installed kn-hydra executable) against references no
one here wrote: the Kubernetes schemas (kubernetes-validate, strict) and Knative Serving's
admission rules (knative_rules.py) under the cluster settings manifests/knative-config applies;
under Knative's defaults the same Service is refused, for exactly the settings that file turns on."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hydraserve.contracts.durations import parse_duration

from .knative_rules import as_pod, knative_violations
from .test_manifests import K8S_VERSION, ROOT


def kn_hydra(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kn-hydra") or str(Path(sys.executable).with_name("kn-hydra"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, env=env)


def cluster_settings() -> dict[str, dict[str, str]]:
    """The data of each ConfigMap manifests/knative-config applies, by name."""
    out = {}
    for path in sorted((ROOT / "knative-config").glob("config-*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "ConfigMap" and doc["metadata"]["namespace"] == "knative-serving"
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        out[doc["metadata"]["name"]] = doc["data"]
    return out


def rules(service: dict[str, Any], settings: dict[str, dict[str, str]] | None = None) -> list[str]:
    settings = cluster_settings() if settings is None else settings
    return knative_violations(service, settings.get("config-features"), settings.get("config-autoscaler"),
                              settings.get("config-defaults"))


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    done = kn_hydra("create", "llama", "--model", "s3://models/llama-2-7b", "--ttft-slo", "7.5s", "--tpot-slo",
                    "200ms", "--gpu", "1", "--namespace", "team-a", "--dry-run", "-o", "yaml")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_the_dry_run_passes_the_schemas_and_knatives_rules_with_the_install_settings(service: dict[str, Any]) -> None:
    assert rules(service) == []
    kubernetes_validate.validate(as_pod(service), K8S_VERSION, strict=True)
    meta, template = service["metadata"], service["spec"]["template"]
    assert (meta["name"], meta["namespace"]) == ("llama", "team-a")
    notes = template["metadata"]["annotations"]
    assert notes["hydraserve.dev/model"] == "s3://models/llama-2-7b"
    assert parse_duration(notes["hydraserve.dev/ttft-slo"]) == 7.5 and parse_duration(notes["hydraserve.dev/tpot-slo"]) == 0.2
    spec = template["spec"]
    assert spec["schedulerName"] == "hydraserve-scheduler" and spec["timeoutSeconds"] == 600
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["containers"][0]["image"].endswith("-cuda")  # a GPU asked for: the image with vLLM for CUDA
    assert notes["serving.knative.dev/progress-deadline"] == "600s"  # covers the cold start, as the timeout


def test_only_the_gpu_image_asks_for_a_gpu() -> None:
    from hydraserve.provider.knative.service import (
        DEFAULT_GPU_IMAGE,
        DEFAULT_IMAGE,
        HydraService,
        knative_service,
    )

    for gpus, image in ((0, DEFAULT_IMAGE), (2, DEFAULT_GPU_IMAGE)):
        container = knative_service(HydraService(name="f", model_uri="s3://models/x", gpus=gpus))["spec"]["template"][
            "spec"]["containers"][0]
        assert container["image"] == image
        assert container["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    mine = HydraService(name="f", model_uri="s3://models/x", gpus=0, image="registry/mine:1")
    assert mine.image == "registry/mine:1"  # an image named is the user's


def test_the_settings_reach_the_annotations_and_the_interceptor_reads_them_back() -> None:
    from hydraserve.activator.knative.admission import function_of
    from hydraserve.contracts.function import setting_default
    from hydraserve.provider.knative.service import IDLE_TIMEOUT_ANNOTATION

    for flags, ttft, idle in (([], setting_default("ttft_slo_s"), setting_default("idle_timeout_s")),
                              (["--ttft-slo", "7500ms", "--idle-timeout", "2m"], 7.5, 120.0)):
        done = kn_hydra("create", "fn", "--model", "s3://models/x", "--tpot-slo", "0.05", *flags, "--dry-run", "-o", "json")
        assert done.returncode == 0, done.stderr
        template = json.loads(done.stdout)["spec"]["template"]
        notes = template["metadata"]["annotations"]
        assert parse_duration(notes[IDLE_TIMEOUT_ANNOTATION]) == idle
        read = function_of({"metadata": {"name": "fn-00001-deployment-x", "annotations": notes,
                                          "labels": {"serving.knative.dev/service": "fn"}}})
        assert (read.name, read.ttft_slo_s, read.tpot_slo_s) == ("fn", ttft, 0.05)


def test_s3_credentials_are_the_functions_own_or_none() -> None:
    """Issue 22 item 11: a function's pods get the S3 credentials of the Secret it names (the
    operator scopes that credential to its model's prefix in the object store's IAM), or none
    at all: then their only credential is their loaderd token, scoped to their model, nodes and
    12 hours. Nothing else of S3 reaches the pod spec."""
    for flags, expected in (([], [{"secretRef": {"name": "hydraserve-s3"}}]),
                            (["--s3-secret", "chat-s3"], [{"secretRef": {"name": "chat-s3"}}]),
                            (["--s3-secret", ""], None)):
        done = kn_hydra("create", "chat", "--model", "s3://models/x", *flags, "--dry-run", "-o", "json")
        assert done.returncode == 0, done.stderr
        [container] = json.loads(done.stdout)["spec"]["template"]["spec"]["containers"]
        assert container.get("envFrom") == expected
        assert not [e for e in container.get("env") or [] if e["name"].startswith("AWS_")]


def test_under_knatives_defaults_the_same_service_is_refused_for_what_the_install_enables(
        service: dict[str, Any]) -> None:
    refused = rules(service, settings={})
    assert len(refused) == 3, refused
    assert any("schedulerName" in r and "kubernetes.podspec-schedulername" in r for r in refused)
    assert any("hostPath" in r and "kubernetes.podspec-volumes-hostpath" in r for r in refused)
    assert any("initial-scale=0" in r for r in refused)


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda s: s["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0].pop("readOnly"), "readOnly"),
    (lambda s: s["spec"]["template"]["spec"]["volumes"][1]["projected"]["sources"][0]["downwardAPI"]["items"][0]
     .pop("path"), "downwardAPI item"),
    (lambda s: s["spec"]["template"]["spec"].update(timeoutSeconds=601), "out of bounds"),
    (lambda s: s["spec"]["template"]["spec"]["containers"][0]["volumeMounts"].pop(), "not mounted"),
    (lambda s: s["spec"]["template"]["metadata"]["annotations"].update(
        {"serving.knative.dev/progress-deadline": "1.5s"}), "whole seconds"),
    (lambda s: s["spec"]["template"]["spec"].update(nodeName="n1"), "nodeName"),
])
def test_the_rules_refuse_what_the_webhook_would(service: dict[str, Any], edit: Any, reason: str) -> None:
    broken = copy.deepcopy(service)
    edit(broken)
    refused = rules(broken)
    assert any(reason in r for r in refused), refused


@pytest.mark.parametrize(("args", "message"), [
    (["create", "Bad_Name", "--model", "s3://models/x", "--dry-run"], "invalid function name"),
    (["create", "ok", "--model", "/local/dir", "--dry-run"], "model_uri"),
    (["create", "ok", "--model", "s3://models/../secret", "--dry-run"], "path traversal"),  # names its directory
    (["create", "ok", "--model", "s3://models/x", "--gpu", "-1", "--dry-run"], "gpus"),
    (["create", "ok", "--model", "s3://models/x", "--timeout", "20m", "--dry-run"], "timeout_s"),
    (["create", "ok", "--model", "s3://models/x", "--ttft-slo", "soon", "--dry-run"], "not a duration"),
])
def test_bad_flags_are_refused_with_a_clear_message(args: list[str], message: str) -> None:
    done = kn_hydra(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_verbs_that_need_a_cluster_say_so_without_one(tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}
    for args in (["list"], ["describe", "llama"], ["delete", "llama"],
                 ["create", "llama", "--model", "s3://models/x"]):
        done = kn_hydra(*args, env=env)
        assert done.returncode == 1 and "no cluster to talk to" in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
