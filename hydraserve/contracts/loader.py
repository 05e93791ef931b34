"""loaderd's local API: request and response bodies (JSON over HTTP, see docs/LOADERD.md).

Shared by the daemon (hydraserve.loaderd.api), its client (hydraserve.loaderd.client), the
placement backends that call prefetch before a worker exists, and the runtime, which attaches
to the segments and reads tensors straight out of shared memory (hydraserve.runtime.loader_files).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.tensors import TensorEntry

SegmentState = Literal["filling", "complete", "failed"]


class SliceRequest(BaseModel):
    """Which bytes of which model: a stage, a list of tensors, or (neither) the whole model."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field(description="s3://bucket/prefix of a Hugging Face model directory")
    endpoint_url: str | None = Field(default=None, description="S3 endpoint; default from env")
    stage: StageSpec | None = None
    tensors: list[str] | None = Field(default=None, min_length=1)
    peers: list[str] = Field(default_factory=list,
                             description="other loaderds (http://host:port) to try before S3")
    background: bool = Field(default=False, description="fetch only when no other slice's bytes wait "
                             "(a consolidating worker's missing layers, behind every cold start)")

    @model_validator(mode="after")
    def _one_selector(self) -> SliceRequest:
        if self.stage is not None and self.tensors is not None:
            raise ValueError("give either stage or tensors, not both")
        return self


class PrefetchRequest(SliceRequest):
    """Start fetching a slice into shared memory; returns at once (the fetch runs on)."""

    pin_s: float = Field(default=300.0, ge=0, le=86400,
                         description="keep the slice from eviction this long waiting for attach")


class AttachRequest(SliceRequest):
    """Take a reference on a slice (prefetching what is missing) to read it from shared memory."""

    pid: int | None = Field(default=None, ge=1,
                            description="reader's pid: the lease is dropped if that process dies")
    heartbeat_s: float | None = Field(
        default=None, ge=1, le=600, description="instead of a pid (a reader in another PID namespace, e.g. a "
        "pod): the lease is dropped unless renewed (POST /v1/renew) within this many seconds")


class ReleaseRequest(BaseModel):
    """Drop a lease taken by prefetch or attach."""

    model_config = ConfigDict(extra="forbid")

    lease_id: str = Field(min_length=1, max_length=64)


class SegmentInfo(BaseModel):
    """One shared-memory segment: a group of tensors (one layer, the embeddings, the head...)."""

    segment_id: str
    path: str = Field(description="file under /dev/shm; open read-only with os.open + mmap")
    model_key: str
    group: str
    order: int = Field(description="position of the group in streaming order (first layers first)")
    state: SegmentState
    size_bytes: int
    tensor_bytes: int
    bytes_ready: int
    tensors: int
    tensors_ready: int
    refcount: int
    last_used: float


class LeaseResponse(BaseModel):
    """Answer to prefetch and attach: the lease and the segments that make up the slice."""

    lease_id: str
    model_key: str
    segments: list[SegmentInfo]
    bytes_total: int = Field(description="tensor bytes of the slice")
    bytes_new: int = Field(description="bytes this call started downloading (0 if all held)")
    tensor_names: list[str]


class ReleaseResponse(BaseModel):
    released: bool


class ModelIndexResponse(BaseModel):
    """GET /v1/index: every tensor of a model version with its byte range (a worker slices its
    stage from it and attaches by name, so it needs no S3 client of its own)."""

    model_key: str
    tensors: list[TensorEntry]


class FileRange(BaseModel):
    """A byte range [start, end) of one model file held by the node."""

    file: str
    start: int
    end: int
    complete: bool


class ModelResidency(BaseModel):
    """What the node holds of one model."""

    model_uri: str
    model_key: str
    model_bytes: int = Field(description="tensor bytes of the whole model")
    bytes_complete: int
    bytes_filling: int
    groups_complete: list[str]
    groups_filling: list[str]
    ranges: list[FileRange]


class LoaderStatus(BaseModel):
    """GET /v1/status: budget, segments and per-model residency."""

    node_name: str
    budget_bytes: int
    used_bytes: int
    pinned_bytes: int
    inflight_chunks: int
    segments: list[SegmentInfo]
    models: list[ModelResidency]
