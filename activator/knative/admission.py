"""Which function pods the interceptor may start: the function a pod says it is (its model and
SLOs), a model its namespace may use, and no view of loaderd's segments but its own model's.

Called by the interceptor (activator/knative/interceptor.py) before anything is made for a pod:
a pod refused here gets one Warning Event (``InvalidFunctionPod``) and no worker Secret, no
prefetch, no binding. The allowlist is the operator's (``HYDRASERVE_MODEL_ALLOWLIST`` in the
ConfigMap hydraserve-config, or ``hydraserve interceptor --model-allowlist``); without one every
served namespace may name any model, as before. The mount rule holds always: a pod whose
hostPath reaches loaderd's directory anywhere but its own model's (provider/knative/service.py
writes exactly that one) could map another model's segments.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hydraserve.contracts.durations import parse_duration
from hydraserve.contracts.function import FunctionConfig
from hydraserve.errors import InvalidRequestError
from hydraserve.provider.knative.service import (
    LOADERD_HOST_DIR,
    MODEL_ANNOTATION,
    TPOT_SLO_ANNOTATION,
    TTFT_SLO_ANNOTATION,
    loaderd_model_dir,
)
from hydraserve.weights.s3_uri import S3Uri, parse_s3_uri

SERVICE_LABEL = "serving.knative.dev/service"  # Knative names a pod's Service with it
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class ModelAllowlist:
    """Per namespace, the S3 prefixes its functions may name (a namespace not listed: none)."""

    prefixes: Mapping[str, tuple[S3Uri, ...]]

    @classmethod
    def parse(cls, text: str) -> ModelAllowlist | None:
        """``NAMESPACE=s3://bucket/prefix[,s3://...]`` entries, one per line or separated by
        ``;``. A prefix covers itself and what lies below it by whole path segments
        (``s3://models/team-a`` covers ``s3://models/team-a/chat``, not ``s3://models/team-ab``);
        ``s3://bucket`` covers the bucket. Blank: None (no allowlist). ValueError if malformed."""
        entries = [e.strip() for e in re.split(r"[;\n]", text) if e.strip() and not e.strip().startswith("#")]
        if not entries:
            return None
        prefixes: dict[str, tuple[S3Uri, ...]] = {}
        for entry in entries:
            namespace, sep, uris = (part.strip() for part in entry.partition("="))
            if not sep or not _NAMESPACE.fullmatch(namespace):
                raise ValueError(f"model allowlist entry {entry!r}: expected NAMESPACE=s3://bucket/prefix[,...]")
            try:
                parsed = tuple(parse_s3_uri(u.strip()) for u in uris.split(",") if u.strip())
            except InvalidRequestError as exc:
                raise ValueError(f"model allowlist entry {entry!r}: {exc.message}") from None
            prefixes[namespace] = prefixes.get(namespace, ()) + parsed
        return cls(prefixes)

    def allows(self, namespace: str, model_uri: str) -> bool:
        try:
            model = parse_s3_uri(model_uri)
        except InvalidRequestError:
            return False
        return any(p.bucket == model.bucket and (not p.key or model.key == p.key or model.key.startswith(p.key + "/"))
                   for p in self.prefixes.get(namespace, ()))


def _reaches_loaderd(path: str) -> bool:
    """Whether a host path is loaderd's directory, inside it, or above it."""
    path = posixpath.normpath("/" + path.lstrip("/"))
    root = LOADERD_HOST_DIR
    return path == root or path.startswith(root + "/") or root.startswith(path.rstrip("/") + "/")


def mount_problem(pod: Mapping[str, Any], model_uri: str) -> str | None:
    """Why the pod may not run with these volumes (None: it may): every hostPath that reaches
    loaderd's directory must be exactly its model's directory, mounted read-only."""
    spec = pod.get("spec") or {}
    own = loaderd_model_dir(model_uri)
    reaching = set()
    for volume in spec.get("volumes") or []:
        host = volume.get("hostPath")
        if host is None or not _reaches_loaderd(str(host.get("path", ""))):
            continue
        if posixpath.normpath(str(host["path"])) != own:
            return (f"volume {volume.get('name')!r} mounts {host['path']} of the node: a function pod may mount "
                    f"only its model's segments, {own}")
        reaching.add(volume.get("name"))
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") in reaching and not mount.get("readOnly"):
                return f"container {container.get('name')!r} mounts {own} writable: loaderd's segments are read-only"
    return None


def admission_problem(pod: Mapping[str, Any], model_uri: str, allowlist: ModelAllowlist | None) -> str | None:
    """Why the interceptor must not start this pod, or None."""
    namespace = pod["metadata"]["namespace"]
    if allowlist is not None and not allowlist.allows(namespace, model_uri):
        return (f"model {model_uri} is not allowed in namespace {namespace} (the operator's model allowlist, "
                "HYDRASERVE_MODEL_ALLOWLIST in hydraserve-config)")
    return mount_problem(pod, model_uri)


def function_of(pod: Mapping[str, Any]) -> FunctionConfig:
    """The function a pod belongs to, from its labels and annotations (ValueError if they do not
    say enough: no model, a bad SLO)."""
    meta = pod["metadata"]
    annotations, labels = meta.get("annotations") or {}, meta.get("labels") or {}
    model = annotations.get(MODEL_ANNOTATION)
    if not model:
        raise ValueError(f"pod {meta['name']} names no model ({MODEL_ANNOTATION})")
    slos: dict[str, object] = {}
    for key, name in ((TTFT_SLO_ANNOTATION, "ttft_slo_s"), (TPOT_SLO_ANNOTATION, "tpot_slo_s")):
        if key in annotations:
            try:
                slos[name] = parse_duration(annotations[key])
            except Exception as exc:
                raise ValueError(f"{key}: {exc}") from exc
    return FunctionConfig.model_validate({"name": labels.get(SERVICE_LABEL, meta["name"][:63]), "model_uri": model, **slos})
