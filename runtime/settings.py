"""Worker settings from the environment (the Knative runtime contract plus our own keys).

Knative sets PORT, K_SERVICE, K_REVISION, K_CONFIGURATION. The backend that spawns the worker
(local process or Kubernetes pod) sets the HYDRASERVE_* keys. Secrets (the loaderd token,
AWS credentials) are read from files or the environment and never logged or echoed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field

from hydraserve.contracts.stage import StageSpec


class WorkerSettings(BaseModel):
    port: int = Field(default=8080, ge=0, le=65535)
    host: str = "127.0.0.1"
    function_name: str = ""
    revision: str = ""
    configuration: str = ""
    model_uri: str
    s3_endpoint_url: str | None = None
    loaderd_url: str | None = None
    loaderd_token: str | None = Field(default=None, repr=False)
    segment: str | None = None  # loaderd segment prepared for this worker at placement time
    stage: StageSpec | None = None
    dtype: str | None = None
    max_batch: int = Field(default=8, ge=1)
    max_model_len: int | None = None
    torch_threads: int | None = Field(default=None, ge=1)  # None: torch's default (one per core)
    spawned_at: float | None = None
    drain_timeout_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        env = os.environ if env is None else env
        token = env.get("HYDRASERVE_LOADERD_TOKEN")
        token_file = env.get("HYDRASERVE_LOADERD_TOKEN_FILE")
        if token_file:
            token = Path(token_file).read_text().strip()
        stage = env.get("HYDRASERVE_STAGE")
        values: dict[str, object] = {
            "port": int(env.get("PORT", "8080")),
            "host": env.get("HYDRASERVE_HOST", "0.0.0.0" if env.get("K_SERVICE") else "127.0.0.1"),
            "function_name": env.get("K_SERVICE", ""),
            "revision": env.get("K_REVISION", ""),
            "configuration": env.get("K_CONFIGURATION", ""),
            "model_uri": env.get("HYDRASERVE_MODEL_URI", ""),
            "s3_endpoint_url": env.get("HYDRASERVE_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL"),
            "loaderd_url": env.get("HYDRASERVE_LOADERD_URL"),
            "loaderd_token": token,
            "segment": env.get("HYDRASERVE_SEGMENT"),
            "stage": StageSpec.model_validate_json(stage) if stage else None,
            "dtype": env.get("HYDRASERVE_DTYPE"),
            "max_batch": int(env.get("HYDRASERVE_MAX_BATCH", "8")),
            "max_model_len": int(env["HYDRASERVE_MAX_MODEL_LEN"]) if env.get("HYDRASERVE_MAX_MODEL_LEN") else None,
            "torch_threads": int(env["HYDRASERVE_TORCH_THREADS"]) if env.get("HYDRASERVE_TORCH_THREADS") else None,
            "spawned_at": float(env["HYDRASERVE_SPAWNED_AT"]) if env.get("HYDRASERVE_SPAWNED_AT") else None,
            "drain_timeout_s": float(env.get("HYDRASERVE_DRAIN_TIMEOUT_S", "30")),
        }
        if not values["model_uri"]:
            raise ValueError("HYDRASERVE_MODEL_URI is not set: the worker needs a model directory or s3:// URI")
        return cls.model_validate(values)
