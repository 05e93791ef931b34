"""The worker's environment: everything a launcher tells a function worker, as env variables.

Written by launchers (the local process launcher today, the pod launcher next) with
``to_env()`` and read by the worker with ``from_env()``, so the two sides cannot drift apart.
Knative's own keys (PORT, K_SERVICE, K_REVISION, K_CONFIGURATION) are part of it; the rest are
HYDRASERVE_*. The worker binds 127.0.0.1 unless HYDRASERVE_HOST says otherwise, also under
Knative, whose queue-proxy dials the user container at 127.0.0.1:$PORT. The loaderd token is a
secret: it comes in its variable or in the file its ``*_FILE`` variable names
(``SECRET_FILE_KEYS``), and never appears in repr() or logs. A token file is kept as
``loaderd_token_file`` too: a pod's is its worker Secret mounted as a volume, re-read whenever the
interceptor renews the token (hydraserve.auth.TokenFile); a file not there (an optional Secret
not written) is no token. A Knative
function pod, whose environment its revision fixed, finds its stage in the file
HYDRASERVE_ROLE_FILE names (hydraserve.contracts.pod): the fields there win over the
environment's, and it listens on every address of its pod (0.0.0.0: peers and probes come from
outside) unless HYDRASERVE_HOST pins one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from hydraserve.contracts.pod import POD_LISTEN_HOST, ROLE_FILE_KEY, role_from_file
from hydraserve.contracts.stage import StageSpec
from hydraserve.errors import HydraError, TemporaryError, error_class

# The routes a function serves to its clients: OpenAI's (as vLLM's server has them) and a
# CloudEvent on POST /. The gateway forwards these only, so nothing else can wake a function.
OPENAI_ROUTES = frozenset({("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                           ("POST", "/tokenize"), ("POST", "/detokenize")})
CLOUDEVENT_ROUTE = ("POST", "/")
FUNCTION_ROUTES = OPENAI_ROUTES | {CLOUDEVENT_ROUTE}

# field -> environment variable
ENV_KEYS: dict[str, str] = {
    "port": "PORT",
    "host": "HYDRASERVE_HOST",
    "transport_port": "HYDRASERVE_TRANSPORT_PORT",
    "function": "HYDRASERVE_FUNCTION",
    "revision": "K_REVISION",
    "configuration": "K_CONFIGURATION",
    "instance_id": "HYDRASERVE_INSTANCE_ID",
    "model_uri": "HYDRASERVE_MODEL_URI",
    "s3_endpoint_url": "HYDRASERVE_S3_ENDPOINT_URL",
    "s3_retry_budget_s": "HYDRASERVE_S3_RETRY_BUDGET_S",
    "s3_fetch": "HYDRASERVE_S3_FETCH",
    "stage": "HYDRASERVE_STAGE",
    "full": "HYDRASERVE_FULL",
    "peers": "HYDRASERVE_PEERS",
    "group_layers": "HYDRASERVE_GROUP_LAYERS",
    "first_token_engine": "HYDRASERVE_FIRST_TOKEN_ENGINE",
    "kv_cache_bytes": "HYDRASERVE_KV_CACHE_BYTES",
    "enforce_eager": "HYDRASERVE_ENFORCE_EAGER",
    "handover_s": "HYDRASERVE_HANDOVER_S",
    "load_format": "HYDRASERVE_LOAD_FORMAT",
    "loaderd_url": "HYDRASERVE_LOADERD_URL",
    "loaderd_token": "HYDRASERVE_LOADERD_TOKEN",
    "loaderd_token_file": "HYDRASERVE_LOADERD_TOKEN_FILE",
    "loaderd_lease": "HYDRASERVE_LOADERD_LEASE",
    "dtype": "HYDRASERVE_DTYPE",
    "max_batch": "HYDRASERVE_MAX_BATCH",
    "max_model_len": "HYDRASERVE_MAX_MODEL_LEN",
    "torch_threads": "HYDRASERVE_TORCH_THREADS",
    "spawned_at": "HYDRASERVE_SPAWNED_AT",
    "drain_timeout_s": "HYDRASERVE_DRAIN_TIMEOUT_S",
}
TOKEN_FILE_KEY = ENV_KEYS["loaderd_token_file"]
SECRET_FILE_KEYS = {"loaderd_token": TOKEN_FILE_KEY}  # secret -> its file
KNATIVE_SERVICE_KEY = "K_SERVICE"


class WorkerEnvironment(BaseModel):
    """One worker of one function instance: what it serves, its stage, and whom it talks to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: int = Field(default=8080, ge=0, le=65535)
    host: str = "127.0.0.1"
    transport_port: int | None = Field(default=None, ge=1, le=65535,
                                       description="where its stage link listens (pipeline groups)")
    function: str = Field(default="", description="the function's name (Knative: K_SERVICE)")
    revision: str = ""
    configuration: str = ""
    instance_id: str = Field(default="", description="the cold start (pipeline group) it belongs to")
    model_uri: str = Field(min_length=1, description="model directory or s3://bucket/prefix")
    s3_endpoint_url: str | None = None
    s3_retry_budget_s: float = Field(default=15.0, gt=0, description="how long one S3 request retries")
    s3_fetch: Literal["stream", "download"] = Field(
        default="stream", description="without loaderd: stream tensors with parallel ranged reads as they "
        "are needed, or download whole files first (the serverless-vLLM baseline)")
    stage: StageSpec | None = Field(default=None, description="layers it holds; None: the whole model")
    full: bool = Field(default=True, description="given memory for the whole model (it will consolidate)")
    peers: list[str] = Field(default_factory=list,
                             description="every stage's link address host:port, in stage order (this one's too)")
    group_layers: list[int] = Field(default_factory=list, description="the decoder layers each stage of its "
                                    "group holds, in stage order (vLLM builds exactly these)")
    first_token_engine: Literal["compact", "vllm"] = Field(
        default="compact", description="what answers the first requests of a worker that "
        "holds the whole model: our compact engine (where it runs the architecture) while vLLM's starts "
        "beside it, then vLLM (measured faster: README), or vLLM from the start")
    kv_cache_bytes: int = Field(default=128 << 20, ge=1 << 20, description="vLLM's KV cache, sized by the "
                                "launcher from the worker's memory grant (no profiling run)")
    enforce_eager: bool = Field(default=True, description="vLLM without torch.compile (the faster cold start "
                                "here: docs/PROTOCOLS.md)")
    handover_s: float = Field(default=10.0, ge=0, description="requests in flight on an engine being replaced "
                              "(a consolidating group's, or the compact engine's first requests) finish there this "
                              "long, then move to the new one")
    load_format: Literal["hydraserve", "auto", "runai_streamer"] = Field(
        default="hydraserve", description="how vLLM reads the weights: our load format (loaderd's shared memory "
        "as the bytes land, else our fetch engine); vLLM's own loader over local files (an s3:// model is "
        "downloaded whole first: the serverless-vLLM baseline); vLLM streaming from S3 (Run:ai Model Streamer)")
    loaderd_url: str | None = Field(default=None, description="the node's loaderd")
    loaderd_token: SecretStr | None = None
    loaderd_token_file: str | None = Field(default=None, description="where the loaderd token is read from, "
                                           "again whenever it changes (a pod's mounted worker Secret)")
    loaderd_lease: Literal["pid", "heartbeat"] = Field(
        default="pid", description="how its loaderd leases live: as long as its pid (same PID namespace as the "
        "daemon) or while it renews them (a pod: its pid means nothing to the daemon)")
    dtype: str | None = None
    max_batch: int = Field(default=8, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    torch_threads: int | None = Field(default=None, ge=1, description="None: torch's default (one per core)")
    spawned_at: float | None = Field(default=None, description="when the launcher spawned it (unix s)")
    drain_timeout_s: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _group_needs_links(self) -> WorkerEnvironment:
        if self.stage is not None and self.stage.num_stages > 1:
            if len(self.peers) != self.stage.num_stages or self.transport_port is None:
                raise ValueError(f"stage {self.stage.index} of {self.stage.num_stages} needs transport_port and "
                                 f"one peer address per stage (got {len(self.peers)})")
            if self.group_layers and (len(self.group_layers) != self.stage.num_stages
                                      or sum(self.group_layers) != self.stage.num_layers
                                      or self.group_layers[self.stage.index] != self.stage.layer_end - self.stage.layer_start):
                raise ValueError(f"group_layers {self.group_layers} do not tile the model as stage "
                                 f"{self.stage.index}'s layers [{self.stage.layer_start}, {self.stage.layer_end}) say")
        return self

    @property
    def is_head(self) -> bool:
        """Stage 0 (or a whole model): the worker with the tokenizer, API server and scheduler."""
        return self.stage is None or self.stage.is_first

    def to_env(self) -> dict[str, str]:
        """Every variable of the contract (and Knative's K_SERVICE); unset fields are written
        empty, which reads as unset, so nothing the launcher's own environment holds leaks in."""
        out: dict[str, str] = {KNATIVE_SERVICE_KEY: self.function}
        for name, key in ENV_KEYS.items():
            value = getattr(self, name)
            if value is None or value == "" or (isinstance(value, list) and not value):
                out[key] = ""
            elif isinstance(value, SecretStr):
                out[key] = value.get_secret_value()
            elif isinstance(value, BaseModel):
                out[key] = value.model_dump_json()
            elif isinstance(value, list):
                out[key] = json.dumps(value)
            elif isinstance(value, bool):
                out[key] = "1" if value else "0"
            else:
                out[key] = str(value)
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerEnvironment:
        """Parse the environment (pydantic checks every value; a bad one names its field)."""
        env = os.environ if env is None else env
        raw: dict[str, Any] = {}
        for name, key in ENV_KEYS.items():
            value = env.get(key)
            if value is None or value == "":
                continue
            if name == "stage":
                raw[name] = StageSpec.model_validate_json(value)
            elif name in ("peers", "group_layers"):
                raw[name] = json.loads(value)
            elif name in ("full", "enforce_eager"):
                raw[name] = value.lower() in ("1", "true", "yes")
            elif name in SECRET_FILE_KEYS:  # wrapped before validation: an error quotes its input
                raw[name] = SecretStr(value)
            else:
                raw[name] = value
        raw.setdefault("function", env.get(KNATIVE_SERVICE_KEY, ""))
        raw.setdefault("s3_endpoint_url", env.get("AWS_ENDPOINT_URL") or None)
        role_file = env.get(ROLE_FILE_KEY)
        if role_file:
            role = role_from_file(role_file)
            raw |= role
            if role:  # placed by the interceptor: peers and probes reach it on its pod IP
                raw.setdefault("host", POD_LISTEN_HOST)
        for name, file_key in SECRET_FILE_KEYS.items():
            if env.get(file_key) and Path(env[file_key]).is_file():
                raw[name] = SecretStr(Path(env[file_key]).read_text().strip())
        if not raw.get("model_uri"):
            raise ValueError("HYDRASERVE_MODEL_URI is not set: the worker needs a model directory or s3:// URI")
        return cls.model_validate(raw)


WorkerState = Literal["starting", "ready", "failed", "draining"]


class WorkerStatus(BaseModel):
    """A worker's ``GET /readyz`` (and ``/healthz``) body: what the cold start, the consolidation
    watch and replica promotion read of it."""

    status: WorkerState
    reason: str | None = Field(default=None, description="why it failed")
    error_type: str | None = Field(default=None, description="the wire name of the error it failed with "
                                   "(hydraserve.errors), so its launcher raises the same class")
    error_code: str | None = None
    inflight: int = Field(default=0, ge=0, description="requests being answered")
    function: str = ""
    revision: str = ""
    consolidated: bool = Field(default=False, description="a group's head now serving the whole model alone")

    def failure(self) -> HydraError:
        """The error a failed worker names, as the class it failed with (a missing model file
        stays a MissingObjectError: its function fails for good); TemporaryError if it names none."""
        cls = error_class(self.error_type, self.error_code) or TemporaryError
        return cls(f"worker failed to start: {self.reason}")
