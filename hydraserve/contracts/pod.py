"""A worker's role as its pod carries it (the Kubernetes backend), written by the interceptor
and read by the runtime, so the two sides cannot drift apart.

A helper stage pod is created by the interceptor and gets its role as environment variables
(hydraserve.contracts.worker). The function's own pod is Knative's: its environment is fixed by
the revision template before anyone knows its stage. Its role is written as an annotation by the
Binding that places it (the pod registry copies a Binding's annotations onto the pod in the same
write that sets its node, so the kubelet sees them before it starts the container), and the
revision template projects the pod's annotations into a file with the Downward API;
``HYDRASERVE_ROLE_FILE`` names that file. No secret is ever in an annotation: the loaderd token
comes from a Secret (``WORKER_SECRET``) through the environment.

Labels tie a cold start's pods together: every pod of an instance has ``INSTANCE_LABEL``, and
``STAGE_LABEL`` selects one stage's pod for its headless Service (the stage's stable DNS name,
which its predecessor dials: pod IPs are unknown when the group's environments are written).
"""

from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path
from typing import Any

ROLE_ANNOTATION = "hydraserve.dev/worker"  # the WorkerEnvironment fields of this pod's stage (JSON)
PLAN_ANNOTATION = "hydraserve.dev/plan"  # the instance's plan (JSON), as bound
TIMELINE_ANNOTATION = "hydraserve.dev/timeline"  # its cold start's timeline (JSON), once it serves
INSTANCE_LABEL = "hydraserve.dev/instance"
STAGE_LABEL = "hydraserve.dev/stage"
ROLE_FILE_KEY = "HYDRASERVE_ROLE_FILE"
WORKER_SECRET_KEY = "loaderd-token"  # the key of the per-function Secret the worker's token is in
POD_LISTEN_HOST = "0.0.0.0"  # a pod's worker listens on its pod IP: peers and probes come from outside
TRANSPORT_PORT = 8090  # not one of Knative's reserved ports (8012, 8013, 8022, 8008, 9090, 9091)
NOT_IN_ROLE = frozenset({"loaderd_token", "spawned_at", "host", "port"})  # secret, or the pod's own


def worker_secret_name(function: str) -> str:
    """The Secret holding a function's workers' loaderd token (scoped to its model)."""
    return f"{function}-hydraserve-worker"


def stage_service_name(instance_id: str, stage: int) -> str:
    """A DNS-1035 label per (instance, stage), short whatever the function's name."""
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:12]
    return f"hs-{digest}-s{stage}"


def role_annotation(fields: dict[str, Any]) -> str:
    """The annotation value for a stage's WorkerEnvironment fields (JSON, ASCII, no secret)."""
    return json.dumps({k: v for k, v in fields.items() if k not in NOT_IN_ROLE and v is not None},
                      sort_keys=True, separators=(",", ":"))


def parse_downward_annotations(text: str) -> dict[str, str]:
    """The kubelet's Downward API annotations file: one ``key="value"`` per line, each value
    quoted as Go's strconv.Quote does (backslash escapes, \\xNN, \\uNNNN)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, quoted = line.partition("=")
        if not sep or len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
            continue
        body = quoted[1:-1]
        try:
            out[key] = codecs.decode(body.encode("ascii"), "unicode_escape") if body.isascii() else body
        except UnicodeDecodeError:
            out[key] = body
    return out


def role_from_file(path: str | Path) -> dict[str, Any]:
    """The role fields a pod's annotations file carries ({} when it has none: a plain pod).
    A role that is not a JSON object is an error the worker must not start past."""
    annotations = parse_downward_annotations(Path(path).read_text())
    raw = annotations.get(ROLE_ANNOTATION)
    if raw is None:
        return {}
    role = json.loads(raw)
    if not isinstance(role, dict):
        raise ValueError(f"{ROLE_ANNOTATION} in {path} is not a JSON object")
    return role
