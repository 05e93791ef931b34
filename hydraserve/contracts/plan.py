"""Placement API: nodes, functions, plans and worker reports (JSON over HTTP, docs/PLACEMENT.md).

Shared by the placement service (hydraserve.provider.api), its client
(hydraserve.provider.client), the backends that carry a plan out (local processes, Kubernetes
pods), the activator that asks for a plan on a cold start, and the simulator, which builds the
same requests in simulated time.

Units: bytes for sizes of model data, GB (10^9 bytes) for GPU memory, Gbit/s for NICs,
seconds for times (``at`` fields are the caller's clock: unix seconds live, simulated seconds in
the simulator).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hydraserve.contracts.function import setting_default
from hydraserve.contracts.loader import PrefetchRequest
from hydraserve.contracts.stage import MAX_PIPELINE_SIZE, StagePlan, StageSpec

KV_RESERVE_GB = 5.0  # HydraServe reserves 5 GB of KV cache per worker (its artifact's algs.py)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Residency(_Strict):
    """What one node's loaderd holds (complete, in shared memory) of one model."""

    model_uri: str = Field(min_length=1)
    layers: list[int] = Field(default_factory=list, description="decoder layers held completely")
    embeddings: bool = Field(default=False, description="token (and position) embeddings held")
    head: bool = Field(default=False, description="final norm and LM head held")


class NodeInfo(_Strict):
    """A node as its backend (or loaderd) registers it; POST /v1/nodes replaces the old record."""

    name: str = Field(min_length=1, max_length=253)
    gpus: int = Field(default=1, ge=0, le=64, description="devices (CPU-only nodes: 1 virtual)")
    gpu_memory_gb: float = Field(gt=0, description="memory of each device")
    gpu_free_gb: list[float] | None = Field(
        default=None, description="free memory per device as seen by the node; default: all free "
        "minus what the placement service allocated")
    nic_gbps: float = Field(default=16.0, gt=0, description="configured NIC bandwidth (calibration "
                            "replaces it with the measured one)")
    loaderd_url: str | None = Field(default=None, description="http://host:port of the node's loaderd")
    address: str | None = Field(default=None, description="where workers on this node listen")
    labels: dict[str, str] = Field(default_factory=dict)
    residency: list[Residency] | None = Field(
        default=None, description="what the node's loaderd holds; None keeps what the service knows")
    schedulable: bool = True
    pool_size: int = Field(default=0, ge=0, le=64, description="idle pre-imported runtime processes its warm "
                           "pool keeps (a cold start there adopts one instead of starting a process)")
    pool_memory_gb: float = Field(default=0.0, ge=0, description="memory the warm pool holds, measured; taken "
                                  "from device 0's budget (refused if it does not fit)")

    @model_validator(mode="after")
    def _check_free(self) -> NodeInfo:
        if self.pool_memory_gb > self.gpu_memory_gb:
            raise ValueError(f"the warm pool's {self.pool_memory_gb} GB exceed the device's {self.gpu_memory_gb} GB")
        if self.gpu_free_gb is not None:
            if len(self.gpu_free_gb) != self.gpus:
                raise ValueError(f"gpu_free_gb has {len(self.gpu_free_gb)} entries for {self.gpus} gpus")
            if any(f < 0 or f > self.gpu_memory_gb + 1e-9 for f in self.gpu_free_gb):
                raise ValueError("gpu_free_gb entries must be within 0..gpu_memory_gb")
        return self


class FunctionSpec(_Strict):
    """An LLM function: its model's shape and sizes, its SLOs and its profiled step times."""

    name: str = Field(min_length=1, max_length=253)
    model_uri: str = Field(min_length=1)
    model_size_bytes: int = Field(gt=0, description="tensor bytes of the whole model")
    num_layers: int = Field(ge=1)
    layer_bytes: list[int] | None = Field(
        default=None, description="bytes of each decoder layer; default: the remainder split evenly")
    embed_bytes: int = Field(default=0, ge=0, description="bytes stage 0 holds beyond its layers")
    head_bytes: int = Field(default=0, ge=0, description="bytes the last stage holds beyond its layers")
    tied_bytes: int = Field(default=0, ge=0, description="bytes counted in both embed_bytes and head_bytes "
                            "(an LM head tied to the token embedding): a one-stage model holds them once")
    ttft_slo_s: float = Field(default=setting_default("ttft_slo_s"), gt=0)
    tpot_slo_s: float = Field(default=setting_default("tpot_slo_s"), gt=0)
    prompt_len: int = Field(default=512, ge=1)
    prefill_s: float | None = Field(default=None, ge=0,
                                    description="profiled prefill of prompt_len on one worker")
    tpot_s: float | None = Field(default=None, ge=0, description="profiled decode step on one worker")
    kv_reserve_gb: float = Field(default=KV_RESERVE_GB, ge=0)
    max_pipeline_size: int = Field(default=MAX_PIPELINE_SIZE, ge=1, le=MAX_PIPELINE_SIZE)
    min_pipeline_size: int = Field(default=1, ge=1, le=MAX_PIPELINE_SIZE,
                                   description="smallest group the planner may pick (a forced p: demos, "
                                   "benchmarks); capped by max_pipeline_size and the layer count")
    min_full_workers: int = Field(default=1, ge=0, le=MAX_PIPELINE_SIZE,
                                  description="workers given memory for the whole model (they "
                                  "consolidate); HydraServe's required_pp_size")
    max_full_workers: int = Field(default=MAX_PIPELINE_SIZE, ge=0, le=MAX_PIPELINE_SIZE,
                                  description="at most this many (each becomes a standalone replica "
                                  "when the group consolidates)")

    @model_validator(mode="after")
    def _check_sizes(self) -> FunctionSpec:
        if self.layer_bytes is not None and len(self.layer_bytes) != self.num_layers:
            raise ValueError(f"layer_bytes has {len(self.layer_bytes)} entries for {self.num_layers} layers")
        if self.min_full_workers > self.max_full_workers:
            raise ValueError("min_full_workers exceeds max_full_workers")
        if self.min_pipeline_size > self.max_pipeline_size:
            raise ValueError("min_pipeline_size exceeds max_pipeline_size")
        if self.tied_bytes > min(self.embed_bytes, self.head_bytes):
            raise ValueError("tied_bytes exceed embed_bytes or head_bytes")
        if self.embed_bytes + self.head_bytes - self.tied_bytes > self.model_size_bytes:
            raise ValueError("embed_bytes + head_bytes - tied_bytes exceed model_size_bytes")
        return self

    @property
    def model_gb(self) -> float:
        return self.model_size_bytes / 1e9

    def per_layer_bytes(self) -> list[int]:
        """Decoder layer sizes, given or derived by spreading the non-embedding bytes evenly."""
        if self.layer_bytes is not None:
            return list(self.layer_bytes)
        rest = self.model_size_bytes - self.embed_bytes - self.head_bytes + self.tied_bytes
        base, extra = divmod(rest, self.num_layers)
        return [base + (1 if i < extra else 0) for i in range(self.num_layers)]


class PlanRequest(_Strict):
    """POST /v1/plan: place one new instance of a function."""

    function: FunctionSpec
    instance_id: str | None = Field(default=None, max_length=128,
                                    description="caller's id for the instance; default: the plan id")
    exclude_nodes: list[str] = Field(default_factory=list, description="nodes to avoid (failed before)")
    dry_run: bool = Field(default=False, description="explain only: reserve nothing")


FetchSource = Literal["s3", "cache", "peer"]


class StagePlacement(_Strict):
    """One worker of the plan: its stage, node, device, memory and where its bytes come from."""

    stage: StageSpec
    node: str
    gpu: int = Field(ge=0)
    memory_gb: float = Field(gt=0)
    full: bool = Field(description="memory for the whole model: this worker consolidates")
    stage_bytes: int = Field(ge=0)
    fetch_bytes: int = Field(ge=0, description="bytes not already in the node's loaderd")
    source: FetchSource
    peers: list[str] = Field(default_factory=list, description="loaderd URLs that hold the bytes")
    pooled: bool = Field(default=False, description="the node had an idle pooled runtime: its start-up was "
                         "predicted as an adoption's")
    loaderd_url: str | None = None
    address: str | None = None
    predicted_fetch_s: float = Field(ge=0)


class Candidate(_Strict):
    """One (p, full workers) option the planner weighed, and what became of it."""

    pipeline_size: int
    full_workers: int
    nodes: list[str] = Field(default_factory=list)
    predicted_ttft_s: float | None = None
    predicted_tpot_s: float | None = None
    feasible: bool
    meets_slo: bool = False
    reason: str = ""


class Plan(_Strict):
    """POST /v1/plan answer: the chosen placement, its predictions and why it was chosen."""

    plan_id: str
    instance_id: str
    function: str
    model_uri: str
    policy: str
    pipeline_size: int = Field(ge=1, le=MAX_PIPELINE_SIZE)
    full_workers: int = Field(ge=0, le=MAX_PIPELINE_SIZE)
    stages: list[StagePlacement] = Field(min_length=1, max_length=MAX_PIPELINE_SIZE)
    predicted_ttft_s: float
    predicted_tpot_s: float
    meets_slo: bool
    fallback: bool = Field(default=False, description="no candidate met the SLOs")
    created_at: float
    explanation: str
    candidates: list[Candidate] = Field(default_factory=list)

    def stage_plan(self) -> StagePlan:
        return StagePlan(num_layers=self.stages[0].stage.num_layers, stages=[s.stage for s in self.stages])

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.stages]

    def prefetch_orders(self, endpoint_url: str | None = None,
                        pin_s: float = 300.0) -> list[tuple[StagePlacement, PrefetchRequest]]:
        """What to tell each chosen node's loaderd before its worker exists (stages already held
        are still ordered: the lease pins them until the worker attaches)."""
        return [(st, PrefetchRequest(model_uri=self.model_uri, endpoint_url=endpoint_url,
                                     stage=st.stage if self.pipeline_size > 1 else None,
                                     peers=st.peers, pin_s=pin_s)) for st in self.stages]


ReportEvent = Literal["ready", "failed", "released", "consolidated"]


class WorkerTimings(_Strict):
    """What a worker observed of its own cold start (seconds); all optional."""

    fetch_s: float | None = Field(default=None, ge=0, description="first to last byte of its slice")
    fetch_bytes: int | None = Field(default=None, ge=0, description="bytes it actually downloaded")
    cold_start_s: float | None = Field(default=None, ge=0, description="plan to ready")
    ttft_s: float | None = Field(default=None, ge=0, description="first request's time to first token")
    tpot_s: float | None = Field(default=None, ge=0)
    sample: bool = Field(default=True, description="calibrate from these timings (False: the worker "
                         "fetched its own weights, a start-up the placement model does not describe)")
    adopted: bool = Field(default=False, description="the worker was a pooled process adopted from its node's "
                          "warm pool (calibrates the adoption's start-up, not a process start's)")


class WorkerReport(_Strict):
    """POST /v1/reports: a worker of a plan became ready, failed, or was released."""

    plan_id: str = Field(min_length=1)
    event: ReportEvent
    stage: int | None = Field(default=None, ge=0, lt=MAX_PIPELINE_SIZE,
                              description="which worker; None: the whole instance")
    at: float | None = Field(default=None, description="when; default: the service's clock")
    timings: WorkerTimings = Field(default_factory=WorkerTimings)
    reason: str | None = Field(default=None, max_length=2000)


class ReportAck(BaseModel):
    """Answer to a report: what the service did with it."""

    plan_id: str
    accepted: bool
    calibrated: list[str] = Field(default_factory=list, description="estimates this report updated")


class NodeStatus(BaseModel):
    """GET /v1/cluster: one node as the planner sees it now."""

    name: str
    gpus: int
    gpu_memory_gb: float
    gpu_free_gb: list[float]
    nic_gbps_configured: float
    nic_gbps_estimated: float
    active_fetches: int
    workers: int
    resident_models: list[str]
    schedulable: bool


class ClusterStatus(BaseModel):
    """GET /v1/cluster."""

    nodes: list[NodeStatus]
    active_plans: int
    startup_constant_s: float
    startup_samples: int
