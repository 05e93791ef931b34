"""A HydraServe function as a Knative Service: the one place that knows every annotation,
volume and scheduler setting the fast path needs (``kn hydra create`` writes it; the pod
interceptor reads the same keys back from the function's pods).

What the Service carries, and why:
- the label ``hydraserve.dev/function`` on the revision template, so its pods carry it from
  creation (the install's NetworkPolicy lets them reach loaderd, the function's lets its
  stages link);
- ``hydraserve.dev/*`` annotations on the revision template: the model and the SLOs the
  placement service plans with (the interceptor reads them from the pending pod);
- ``schedulerName: hydraserve-scheduler``: a new pod of the revision is the scale-from-zero
  event; our interceptor, not the default scheduler, binds it (Knative needs
  ``kubernetes.podspec-schedulername: enabled``);
- its model's directory of the node's loaderd, and nothing else of it, mounted read-only at
  the same path (a hostPath; Knative needs ``kubernetes.podspec-volumes-hostpath: enabled`` and
  allows such mounts read-only only): the worker maps its model's shared-memory segments from
  it and cannot see another model's. The directory is named from the model URI
  (``model_dir_name``), known when the Service is written, before any version of the model is;
  the interceptor refuses a pod that mounts more of loaderd's directory than this
  (activator/knative/admission.py);
- the pod's own annotations as files (the Downward API inside a projected volume, which
  Knative allows without a flag): the role the interceptor writes at bind time (stage, peers,
  layer range, full or partial) reaches the runtime there (``HYDRASERVE_ROLE_FILE``);
- the loaderd token from the function's worker Secret, which the interceptor writes (a token
  scoped to the function's model; optional, so a pod starts without it and reads S3 itself);
- ``autoscaling.knative.dev/initial-scale: "0"``: a function created is at zero and costs
  nothing until its first request (needs ``allow-zero-initial-scale``); min-scale 0;
- ``timeoutSeconds`` and ``serving.knative.dev/progress-deadline`` that cover a cold start
  (time a request waits in Knative's activator counts against the revision timeout).
The cluster settings are in manifests/knative-config.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from hydraserve.contracts.durations import duration_text
from hydraserve.contracts.function import FunctionConfig, validate_function_name
from hydraserve.contracts.pod import (
    ROLE_FILE_KEY,
    WORKER_SECRET_KEY,
    worker_secret_name,
)
from hydraserve.contracts.worker import ENV_KEYS
from hydraserve.errors import InvalidRequestError
from hydraserve.weights.segment import model_dir_name

ANNOTATION_PREFIX = "hydraserve.dev/"
MODEL_ANNOTATION = ANNOTATION_PREFIX + "model"
TTFT_SLO_ANNOTATION = ANNOTATION_PREFIX + "ttft-slo"
TPOT_SLO_ANNOTATION = ANNOTATION_PREFIX + "tpot-slo"
# The idle timeout: Knative keeps the last pod this long once its autoscaler has seen no request
# for its stable window (60 s by default) and decided to scale to zero.
IDLE_TIMEOUT_ANNOTATION = "autoscaling.knative.dev/scale-to-zero-pod-retention-period"
SCHEDULER_NAME = "hydraserve-scheduler"
FUNCTION_LABEL = ANNOTATION_PREFIX + "function"  # on every pod of a function (NetworkPolicies select by it)
LOADERD_HOST_DIR = "/run/hydraserve/loaderd"  # the DaemonSet's segments (a host tmpfs directory)
ROLE_DIR = "/etc/hydraserve/pod"  # the pod's annotations, as files
WORKER_SECRET_DIR = "/etc/hydraserve/worker"  # the function's worker Secret, as files (renewed in place)
WORKER_SECRET_VOLUME = "worker-secret"
RUNTIME_PORT = 8080
# The worker's /livez answers whenever its serving loop runs (failed or not): 3 misses 5 s apart
# and the kubelet restarts a deadlocked worker's container.
LIVENESS_PROBE: dict[str, Any] = {"httpGet": {"path": "/livez"}, "periodSeconds": 5, "timeoutSeconds": 2,
                                  "failureThreshold": 3}
DEFAULT_IMAGE = "ghcr.io/OWNER/hydraserve:0.1.0"  # vLLM for CPUs (manifests/Dockerfile)
DEFAULT_GPU_IMAGE = DEFAULT_IMAGE + "-cuda"  # vLLM with CUDA (the Dockerfile's ENGINE=gpu variant)


class HydraService(FunctionConfig):
    """What a user says about one function (``kn hydra create``'s flags): its settings, the
    FunctionConfig every deployment shares, and where on Knative its workers run."""

    namespace: str = "default"
    model_uri: str = Field(pattern=r"^s3://[^/]+/.+")
    gpus: int = Field(default=1, ge=0, le=8, description="GPUs per worker (0: a CPU worker)")
    image: str = Field(default="", description="the runtime image; default: the GPU variant when the worker "
                       "has GPUs, the CPU one when it has none (only the GPU image asks for a GPU)")
    cpu: str = Field(default="2", pattern=r"^\d+(\.\d+)?m?$", description="CPU each worker requests")
    memory: str = Field(default="32Gi", pattern=r"^\d+(Ki|Mi|Gi|Ti)?$", description="host memory of each worker "
                        "(request and limit)")
    timeout_s: int = Field(default=600, ge=1, le=600, description="the revision's timeoutSeconds: a cold start and "
                           "the whole answer must fit (at most Knative's default max-revision-timeout-seconds)")
    s3_secret: str | None = Field(default="hydraserve-s3", description="a Secret with the S3 credentials")

    @model_validator(mode="after")
    def _image_for_the_device(self) -> HydraService:
        if not self.image:
            self.image = DEFAULT_GPU_IMAGE if self.gpus else DEFAULT_IMAGE
        return self

    @field_validator("group_replicas")
    @classmethod
    def _one_replica(cls, value: int) -> int:
        """On Knative a consolidated group is one pod; scaling out is Knative's."""
        if value != 1:
            raise ValueError("on Knative a consolidated group is one pod; scale out with --max-instances "
                             "(Knative adds pods, each a cold start the planner places)")
        return value

    @field_validator("model_uri")
    @classmethod
    def _safe_uri(cls, value: str) -> str:
        """A URI the S3 client takes (no '..', a valid bucket): its directory is named from it."""
        try:
            model_dir_name(value)
        except InvalidRequestError as exc:
            raise ValueError(exc.message) from None
        return value

    @field_validator("namespace")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        return validate_function_name(value)


def worker_secret_env(function: str) -> list[dict[str, Any]]:
    """Where a function's workers read their loaderd token (the revision's and every helper pod's
    environment): a file of the worker Secret's volume (``worker_secret_volume``), not a variable,
    because the token expires and the interceptor renews it: the kubelet updates a mounted
    Secret's files in place and the worker re-reads the file when it changes, so a pod serving
    for days keeps a valid token (an environment variable is fixed at the container's start)."""
    return [{"name": ENV_KEYS["loaderd_token"], "value": ""},  # never a token's value in a pod's spec
            {"name": ENV_KEYS["loaderd_token_file"], "value": f"{WORKER_SECRET_DIR}/{WORKER_SECRET_KEY}"}]


def worker_secret_volume(function: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker Secret as a volume, and its read-only mount. Optional: a pod starts without it
    (no token: it reads S3 itself)."""
    volume = {"name": WORKER_SECRET_VOLUME, "secret": {"secretName": worker_secret_name(function), "optional": True,
                                                       "items": [{"key": WORKER_SECRET_KEY, "path": WORKER_SECRET_KEY}]}}
    return volume, {"name": WORKER_SECRET_VOLUME, "mountPath": WORKER_SECRET_DIR, "readOnly": True}


def loaderd_model_dir(model_uri: str) -> str:
    """The host directory holding the model's segments on every node (loaderd/registry.py)."""
    return f"{LOADERD_HOST_DIR}/{model_dir_name(model_uri)}"


def loaderd_volume(model_uri: str) -> dict[str, Any]:
    """The pod's one view of loaderd: its model's directory (``Directory``: loaderd makes it, 0700
    and its own, at the model's first prefetch on the node; a directory the kubelet made would be
    root's, where loaderd could not write)."""
    return {"name": "loaderd", "hostPath": {"path": loaderd_model_dir(model_uri), "type": "Directory"}}


def loaderd_mount(model_uri: str) -> dict[str, Any]:
    """Mounted where loaderd's segment paths say (the host path itself), read-only."""
    return {"name": "loaderd", "mountPath": loaderd_model_dir(model_uri), "readOnly": True}


def knative_service(fn: HydraService) -> dict[str, Any]:
    """The serving.knative.dev/v1 Service for ``fn``."""
    annotations = {
        MODEL_ANNOTATION: fn.model_uri,
        TTFT_SLO_ANNOTATION: duration_text(fn.ttft_slo_s),
        TPOT_SLO_ANNOTATION: duration_text(fn.tpot_slo_s),
        "autoscaling.knative.dev/initial-scale": "0",
        "autoscaling.knative.dev/min-scale": "0",
        IDLE_TIMEOUT_ANNOTATION: duration_text(fn.idle_timeout_s),
        "autoscaling.knative.dev/max-scale": str(fn.max_instances),
        "serving.knative.dev/progress-deadline": f"{fn.timeout_s}s",
    }
    if fn.concurrency:
        annotations["autoscaling.knative.dev/target"] = str(fn.concurrency)
    limits: dict[str, str] = {"memory": fn.memory}
    if fn.gpus:
        limits["nvidia.com/gpu"] = str(fn.gpus)
    container: dict[str, Any] = {
        "name": "runtime",
        "image": fn.image,
        "args": ["serve"],
        "ports": [{"containerPort": RUNTIME_PORT}],
        "env": [{"name": "HYDRASERVE_MODEL_URI", "value": fn.model_uri},
                {"name": ROLE_FILE_KEY, "value": f"{ROLE_DIR}/annotations"}, *worker_secret_env(fn.name)],
        "readinessProbe": {"httpGet": {"path": "/readyz"}, "periodSeconds": 1, "failureThreshold": fn.timeout_s},
        "livenessProbe": LIVENESS_PROBE,  # a deadlocked worker is restarted (a failed one answers it)
        "resources": {"requests": {"cpu": fn.cpu, "memory": fn.memory}, "limits": limits},
        "volumeMounts": [
            loaderd_mount(fn.model_uri),
            {"name": "pod-info", "mountPath": ROLE_DIR, "readOnly": True},
            worker_secret_volume(fn.name)[1],
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    if fn.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": fn.s3_secret}}]
    spec: dict[str, Any] = {
        "schedulerName": SCHEDULER_NAME,
        "timeoutSeconds": fn.timeout_s,
        "containers": [container],
        "volumes": [
            loaderd_volume(fn.model_uri),
            {"name": "pod-info", "projected": {"sources": [{"downwardAPI": {"items": [
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
                {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}}]}},
            worker_secret_volume(fn.name)[0],
        ],
    }
    if fn.concurrency:
        spec["containerConcurrency"] = fn.concurrency
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": fn.name, "namespace": fn.namespace,
                     "labels": {"app.kubernetes.io/part-of": "hydraserve", FUNCTION_LABEL: fn.name}},
        "spec": {"template": {"metadata": {"labels": {FUNCTION_LABEL: fn.name}, "annotations": annotations},
                              "spec": spec}},
    }
