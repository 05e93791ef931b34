"""manifests/ checked against references no one here wrote: the Kubernetes schemas
(kubernetes-validate, strict: unknown fields fail) and Knative's admission rules
(knative_rules.py, transcribed from Knative Serving's webhook); then the standalone Service's
container contract is exercised against the real runtime: the image's command with the
manifest's env and the env Knative adds, probed on the manifest's readiness path."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import requests
import yaml

from hydraserve.processes import free_port

from .knative_rules import as_pod, knative_violations

ROOT = Path(__file__).resolve().parents[2] / "manifests"
K8S_VERSION = "1.31.0"


def documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(ROOT.rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def knative_services() -> list[dict[str, Any]]:
    """The plain Services of manifests/standalone (the fast path's example is checked under the
    install's cluster settings in test_install.py)."""
    return [d for p, d in documents() if d.get("kind") == "Service" and "knative" in d.get("apiVersion", "")
            and p.parent.name == "standalone"]


def test_every_kustomization_names_files_that_exist() -> None:
    kustomizations = [(p, d) for p, d in documents() if d.get("kind") == "Kustomization"]
    assert kustomizations
    for path, doc in kustomizations:
        for resource in doc["resources"]:
            assert (path.parent / resource).is_file(), f"{path}: {resource} does not exist"


@pytest.mark.parametrize("service", knative_services(), ids=lambda s: s["metadata"]["name"])
def test_knative_service_passes_kubernetes_schemas_and_knative_rules(service: dict[str, Any]) -> None:
    assert knative_violations(service) == []
    kubernetes_validate.validate(as_pod(service), K8S_VERSION, strict=True)


def test_the_rules_catch_what_the_webhook_would_refuse() -> None:
    """The checks above could fail: each broken variant is refused for the right reason."""
    good = knative_services()[0]

    def broken(edit: Any) -> dict[str, Any]:
        svc = copy.deepcopy(good)
        edit(svc["spec"]["template"]["spec"], svc["spec"]["template"]["spec"]["containers"][0])
        return svc

    cases = {
        "reserved": lambda s, c: c["env"].append({"name": "PORT", "value": "9"}),
        "port 8012 is reserved": lambda s, c: c["ports"][0].update(containerPort=8012),
        "schedulerName: not allowed": lambda s, c: s.update(schedulerName="hydraserve"),
        "lifecycle: not allowed": lambda s, c: c.update(lifecycle={"preStop": {"exec": {"command": ["true"]}}}),
        "2 containers": lambda s, c: s["containers"].append(dict(c, name="second")),
        "hostPath": lambda s, c: s.update(volumes=[{"name": "shm", "hostPath": {"path": "/dev/shm"}}]),
    }
    for reason, edit in cases.items():
        assert any(reason in v for v in knative_violations(broken(edit))), reason
    for edit in (lambda s, c: c.update(imagePulPolicy="Always"),  # a typo: unknown field
                 lambda s, c: c["ports"][0].update(containerPort="http")):  # wrong type
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(as_pod(broken(edit)), K8S_VERSION, strict=True)


@pytest.mark.parametrize("service", knative_services(), ids=lambda s: s["metadata"]["name"])
def test_runtime_honours_the_services_container_contract(service: dict[str, Any], tiny_llama_dir: Path,
                                                          tmp_path: Path) -> None:
    """Run the container's command as Knative would (its env + PORT/K_*), with a local model
    instead of S3, and probe the manifest's readiness path until the function can serve."""
    container = service["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    assert env.get("HYDRASERVE_MODEL_URI", "").startswith("s3://")
    port = free_port()
    env.update(HYDRASERVE_MODEL_URI=str(tiny_llama_dir), PORT=str(port), K_SERVICE=service["metadata"]["name"],
               K_CONFIGURATION=service["metadata"]["name"], K_REVISION=f"{service['metadata']['name']}-00001",
               HYDRASERVE_HOST="127.0.0.1")  # Knative's pods listen on 0.0.0.0; tests stay on loopback
    command = [sys.executable, "-m", "hydraserve.cli", *container.get("args", ["serve"])]
    log = open(tmp_path / "runtime.log", "wb")
    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    probe = container["readinessProbe"]["httpGet"]["path"]
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "runtime.log").read_text()[-2000:]
            try:
                if requests.get(base + probe, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("never ready")
        r = requests.post(base + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        models = requests.get(base + "/v1/models", timeout=5).json()["data"]
        assert models and models[0]["id"]
        liveness = container["livenessProbe"]  # the kubelet restarts a worker that stops answering it
        assert requests.get(base + liveness["httpGet"]["path"], timeout=2).status_code == 200
        assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 30
    finally:
        proc.terminate()
        code = proc.wait(60)
        log.close()
    assert code == 0, (tmp_path / "runtime.log").read_text()[-2000:]
