"""Knative Serving's admission rules for a Service's pod template, as its webhook applies them.

Transcribed (not imported: Knative is Go) from knative.dev/serving (checked against HEAD
98e5ef90aa): pkg/apis/serving/fieldmask.go (which PodSpec / Container / volume / projection /
probe / port fields a revision may set, and the feature flag behind each optional one),
k8s_validation.go (reserved env vars, ports, container names and mount paths; mounts match
declared volumes, every volume is mounted, read-only unless emptyDir / PVC / ephemeral; one
port), pkg/apis/config/features.go (flag names and defaults; a pod-spec field needs its flag
not "disabled", a volume type needs it "enabled"), pkg/apis/autoscaling/annotation_validation.go
and v1/revision_validation.go (initial-scale 0 only with config-autoscaler's
allow-zero-initial-scale, scale bounds, target >= 0.01, progress-deadline in whole seconds,
timeoutSeconds up to config-defaults' max-revision-timeout-seconds, 600 by default). The
cluster's settings are passed in (``features``, ``autoscaler``, ``defaults``: ConfigMap data);
absent, Knative's defaults apply. The Kubernetes side of the same template is checked
separately with kubernetes-validate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# fieldmask.go: PodSpecMask: always allowed, and each optional field's flag (features.go: all
# "disabled" by default).
POD_SPEC_FIELDS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks"}
POD_SPEC_FLAGS = {
    "affinity": "kubernetes.podspec-affinity", "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "hostAliases": "kubernetes.podspec-hostaliases", "nodeSelector": "kubernetes.podspec-nodeselector",
    "runtimeClassName": "kubernetes.podspec-runtimeclassname", "tolerations": "kubernetes.podspec-tolerations",
    "securityContext": "kubernetes.podspec-securitycontext",
    "shareProcessNamespace": "kubernetes.podspec-shareprocessnamespace",
    "priorityClassName": "kubernetes.podspec-priorityclassname", "schedulerName": "kubernetes.podspec-schedulername",
    "initContainers": "kubernetes.podspec-init-containers", "dnsPolicy": "kubernetes.podspec-dnspolicy",
    "dnsConfig": "kubernetes.podspec-dnsconfig", "hostIPC": "kubernetes.podspec-hostipc",
    "hostPID": "kubernetes.podspec-hostpid", "hostNetwork": "kubernetes.podspec-hostnetwork"}
# RevisionSpec adds these next to the PodSpec.
REVISION_FIELDS = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
CONTAINER_FIELDS = {"name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy",
                    "livenessProbe", "ports", "readinessProbe", "resources", "securityContext",
                    "terminationMessagePath", "terminationMessagePolicy", "volumeMounts"}
PROBE_FIELDS = {"httpGet", "tcpSocket", "exec", "initialDelaySeconds", "timeoutSeconds", "periodSeconds",
                "successThreshold", "failureThreshold"}
PORT_FIELDS = {"containerPort", "name", "protocol"}
VOLUME_SOURCES = {"secret", "configMap", "projected"}  # always; the others need their flag "enabled"
VOLUME_FLAGS = {"emptyDir": "kubernetes.podspec-volumes-emptydir",
                "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim",
                "hostPath": "kubernetes.podspec-volumes-hostpath", "csi": "kubernetes.podspec-volumes-csi",
                "ephemeral": "kubernetes.podspec-volumes-ephemeral", "image": "kubernetes.podspec-volumes-image"}
WRITABLE_VOLUMES = {"emptyDir", "persistentVolumeClaim", "ephemeral"}  # every other mount must be readOnly
PROJECTION_SOURCES = {"secret", "configMap", "serviceAccountToken", "downwardAPI"}
DEFAULT_FEATURES = {"kubernetes.podspec-volumes-emptydir": "enabled", "multi-container": "enabled"}
DEFAULT_MAX_TIMEOUT_S = 600

# k8s_validation.go
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}  # queue-proxy, metrics, profiling
RESERVED_CONTAINER_NAMES = {"queue-proxy"}
RESERVED_PATHS = {"/", "/dev", "/dev/log"}
PORT_NAMES = {"", "h2c", "http1"}


def _flag(features: Mapping[str, str], name: str) -> str:
    return str(features.get(name, DEFAULT_FEATURES.get(name, "disabled"))).lower()


def knative_violations(service: dict[str, Any], features: Mapping[str, str] | None = None,
                       autoscaler: Mapping[str, str] | None = None,
                       defaults: Mapping[str, str] | None = None) -> list[str]:
    """Every rule the Service's revision template breaks under these cluster settings (empty:
    the webhook would admit it)."""
    features, autoscaler, defaults = features or {}, autoscaler or {}, defaults or {}
    out: list[str] = []
    if service.get("apiVersion") != "serving.knative.dev/v1" or service.get("kind") != "Service":
        return [f"not a serving.knative.dev/v1 Service: {service.get('apiVersion')} {service.get('kind')}"]
    template = service.get("spec", {}).get("template", {})
    spec = template.get("spec", {})
    allowed = POD_SPEC_FIELDS | REVISION_FIELDS | {k for k, flag in POD_SPEC_FLAGS.items()
                                                   if _flag(features, flag) != "disabled"}
    out += [f"spec.template.spec.{k}: not allowed" + (f" (needs {POD_SPEC_FLAGS[k]})" if k in POD_SPEC_FLAGS else "")
            for k in sorted(set(spec) - allowed)]
    out += _annotation_violations(service, template.get("metadata", {}).get("annotations") or {}, autoscaler)
    timeout = spec.get("timeoutSeconds")
    max_timeout = int(defaults.get("max-revision-timeout-seconds", DEFAULT_MAX_TIMEOUT_S))
    if timeout is not None and not 0 <= timeout <= max_timeout:
        out.append(f"timeoutSeconds {timeout}: out of bounds 0..{max_timeout} (max-revision-timeout-seconds)")
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
            source = env.get("valueFrom") or {}
            if ({"fieldRef", "resourceFieldRef"} & set(source)
                    and _flag(features, "kubernetes.podspec-fieldref") != "enabled"):
                out.append(f"{where}: env {env['name']} from a field needs kubernetes.podspec-fieldref: enabled")
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
        out += _mount_violations(where, c.get("volumeMounts") or [], spec.get("volumes") or [])
    if ports_seen > 1:
        out.append("more than one container port")
    mounted = {m.get("name") for c in containers for m in c.get("volumeMounts") or []}
    for vol in spec.get("volumes") or []:
        sources = set(vol) - {"name"}
        allowed_sources = VOLUME_SOURCES | {k for k, flag in VOLUME_FLAGS.items() if _flag(features, flag) == "enabled"}
        if len(sources) != 1:
            out.append(f"volume {vol.get('name')}: exactly one source, not {sorted(sources)}")
        out += [f"volume {vol.get('name')}: {k} not allowed" + (f" (needs {VOLUME_FLAGS[k]}: enabled)"
                                                                if k in VOLUME_FLAGS else "")
                for k in sorted(sources - allowed_sources)]
        if vol.get("name") not in mounted:
            out.append(f"volume with name {vol.get('name')!r} not mounted")
        for source in (vol.get("projected") or {}).get("sources") or []:
            kinds = set(source)
            if len(kinds) != 1 or not kinds <= PROJECTION_SOURCES:
                out.append(f"volume {vol.get('name')}: projected source {sorted(kinds)} not allowed")
            for item in (source.get("downwardAPI") or {}).get("items") or []:
                if not item.get("path") or ("fieldRef" in item) == ("resourceFieldRef" in item):
                    out.append(f"volume {vol.get('name')}: downwardAPI item needs a path and one of fieldRef, "
                               "resourceFieldRef")
    return out


def _mount_violations(where: str, mounts: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> list[str]:
    out = []
    kinds = {v.get("name"): next(iter(set(v) - {"name"}), "") for v in volumes}
    for mount in mounts:
        path = mount.get("mountPath", "")
        if path in RESERVED_PATHS:
            out.append(f"{where}: mount path {path} is reserved")
        if not path.startswith("/"):
            out.append(f"{where}: mount path {path!r} must be absolute")
        kind = kinds.get(mount.get("name"))
        if kind is None:
            out.append(f"{where}: volumeMount {mount.get('name')!r} has no matching volume")
        elif kind not in WRITABLE_VOLUMES and mount.get("readOnly") is not True:
            out.append(f"{where}: volume mount {mount.get('name')} ({kind}) should be readOnly")
    return out


def _annotation_violations(service: dict[str, Any], annotations: Mapping[str, str],
                           autoscaler: Mapping[str, str]) -> list[str]:
    out = []
    own = service.get("metadata", {}).get("annotations") or {}
    out += [f"metadata.annotations {k}: autoscaling annotations belong on spec.template"
            for k in own if k.startswith("autoscaling.knative.dev/")]

    def integer(key: str) -> int | None:
        value = annotations.get(key)
        if value is None:
            return None
        if not re.fullmatch(r"\d+", str(value)):
            out.append(f"{key}={value!r}: not a non-negative integer")
            return None
        return int(value)

    initial = integer("autoscaling.knative.dev/initial-scale")
    if initial == 0 and str(autoscaler.get("allow-zero-initial-scale", "false")).lower() != "true":
        out.append("autoscaling.knative.dev/initial-scale=0 not allowed by cluster (allow-zero-initial-scale)")
    low, high = integer("autoscaling.knative.dev/min-scale"), integer("autoscaling.knative.dev/max-scale")
    if low is not None and high and high < low:
        out.append(f"max-scale {high} below min-scale {low}")
    target = annotations.get("autoscaling.knative.dev/target")
    if target is not None:
        try:
            if float(target) < 0.01:
                out.append(f"autoscaling.knative.dev/target={target}: below 0.01")
        except ValueError:
            out.append(f"autoscaling.knative.dev/target={target!r}: not a number")
    deadline = annotations.get("serving.knative.dev/progress-deadline")
    if deadline is not None and (deadline == "" or not re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", str(deadline))):
        out.append(f"serving.knative.dev/progress-deadline={deadline!r}: whole seconds (e.g. 600s)")
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
