"""Knative Serving's admission rules for a Service's pod template, as its webhook applies them.

Transcribed (not imported: Knative is Go) from knative.dev/serving pkg/apis/serving:
fieldmask.go (which PodSpec / Container / probe / port fields a revision may set, with the
default feature flags) and k8s_validation.go (reserved env vars, ports, container names and
mount paths; one container unless multi-container is used; port names). The Kubernetes side of
the same template is checked separately with kubernetes-validate.
"""

from __future__ import annotations

from typing import Any

# fieldmask.go: PodSpecMask with the feature flags at their defaults (affinity, host aliases,
# node selector, runtime class, tolerations and pod security context are "disabled").
POD_SPEC_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks"}
# RevisionSpec adds these next to the PodSpec.
REVISION_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                    "livenessProbe", "ports", "readinessProbe", "resources", "securityContext",
                    "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
PROBE_FIELDS = {"httpGet", "tcpSocket", "exec", "initialDelaySeconds", "timeoutSeconds", "periodSeconds",
                "successThreshold", "failureThreshold"}
PORT_FIELDS = {"containerPort", "name", "protocol"}
VOLUME_SOURCES = {"secret", "configMap", "projected"}  # others need feature flags

# k8s_validation.go
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}  # queue-proxy, metrics, profiling
RESERVED_CONTAINER_NAMES = {"queue-proxy"}
RESERVED_PATHS = {"/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"}
PORT_NAMES = {"", "h2c", "http1"}


def knative_violations(service: dict[str, Any]) -> list[str]:
    """Every rule the Service's revision template breaks (empty: the webhook would admit it)."""
    out: list[str] = []
    if service.get("apiVersion") != "serving.knative.dev/v1" or service.get("kind") != "Service":
        return [f"not a serving.knative.dev/v1 Service: {service.get('apiVersion')} {service.get('kind')}"]
    spec = service.get("spec", {}).get("template", {}).get("spec", {})
    out += [f"spec.template.spec.{k}: not allowed" for k in sorted(set(spec) - POD_SPEC_FIELDS - REVISION_FIELDS)]
    containers = spec.get("containers") or []
    if len(containers) != 1:
        out.append(f"{len(containers)} containers: one serving container (multi-container needs ports on one)")
    ports_seen = 0
    for c in containers:
        where = f"container {c.get('name', '?')}"
        out += [f"{where}.{k}: not allowed" for k in sorted(set(c) - CONTAINER_FIELDS)]
        if c.get("name") in RESERVED_CONTAINER_NAMES:
            out.append(f"{where}: reserved name")
        if not c.get("image"):
            out.append(f"{where}: image is required")
        for env in c.get("env") or []:
            if env.get("name") in RESERVED_ENV:
                out.append(f"{where}: env {env['name']} is reserved (Knative sets it)")
        for port in c.get("ports") or []:
            ports_seen += 1
            out += [f"{where}.ports.{k}: not allowed" for k in sorted(set(port) - PORT_FIELDS)]
            if port.get("containerPort") in RESERVED_PORTS:
                out.append(f"{where}: port {port['containerPort']} is reserved")
            if port.get("name", "") not in PORT_NAMES:
                out.append(f"{where}: port name {port['name']!r} (only h2c or http1)")
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                continue
            out += [f"{where}.{kind}.{k}: not allowed" for k in sorted(set(probe) - PROBE_FIELDS)]
            action = probe.get("httpGet") or probe.get("tcpSocket") or {}
            declared = {p.get("containerPort") for p in c.get("ports") or []} or {8080}
            if "port" in action and action["port"] not in declared:
                out.append(f"{where}.{kind}: probes may only target the container's serving port")
        for mount in c.get("volumeMounts") or []:
            if mount.get("mountPath") in RESERVED_PATHS:
                out.append(f"{where}: mount path {mount['mountPath']} is reserved")
    if ports_seen > 1:
        out.append("more than one container port")
    for vol in spec.get("volumes") or []:
        sources = set(vol) - {"name"}
        if not sources <= VOLUME_SOURCES:
            out.append(f"volume {vol.get('name')}: {sorted(sources - VOLUME_SOURCES)} not allowed")
    return out


def as_pod(service: dict[str, Any]) -> dict[str, Any]:
    """The revision's pod as Kubernetes will see it (Knative's defaulting: probes target the
    serving port), to check against the Kubernetes schemas."""
    template = service["spec"]["template"]
    spec = {k: v for k, v in template["spec"].items() if k not in REVISION_FIELDS}
    containers = []
    for c in spec.get("containers", []):
        c = dict(c)
        port = (c.get("ports") or [{"containerPort": 8080}])[0]["containerPort"]
        for kind in ("readinessProbe", "livenessProbe"):
            if kind in c:
                probe = dict(c[kind])
                for action in ("httpGet", "tcpSocket"):
                    if action in probe:
                        probe[action] = {"port": port, **probe[action]}
                c[kind] = probe
        containers.append(c)
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": service["metadata"]["name"], **({"annotations": template["metadata"]["annotations"]}
                                                              if template.get("metadata", {}).get("annotations") else {})},
            "spec": {**spec, "containers": containers}}
