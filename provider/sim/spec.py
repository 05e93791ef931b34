"""What the simulator simulates: nodes (true NICs, GPU kind), model functions, and stage times.

Stage times are fitted to HydraServe's Figure 7 (cold-start TTFT per system and model; the per-model values are in the
artifact's ae_scripts/figure7.py), separately for V100 and A10 nodes, by least squares over all
seven models of the figure (OPT-2.7B/6.7B/13B, Llama2-7B/13B, Llama3-8B, Falcon-7B; fp16 sizes),
with F the fetch on the simulator's NIC (16 Gbps x 0.9 goodput = 1.8 GB/s when alone), S in GB:

* overlapped (HydraServe, ours): a worker is ready at max(F_end, t0 + W) + C + K x S_stage, W the
  start-up that overlaps the fetch (container, imports, device init, KV cache), C + K x S what
  follows the last byte. Fitted on single-worker and 4-stage (HydraServe) cold starts (the
  artifact forces one worker for models under 10 GB): V100 W 6.28 s, C 1.73 s, K 0.046 s/GB
  (Llama2-7B 9.9 / 8.2 s for 1 / 4 stages, paper 9.9 / 7.7; 13B 17.4 / 8.3, paper 17.4 / 8.7);
  A10 W 4.64 s, C 0.94 s, K 0.003 s/GB (7B 8.5 / 5.6 s, paper 8.4 / 5.6). The group is ready
  when its slowest stage is. On a V100 no 7B cold start can meet the 7.5 s TTFT SLO (its floor
  is W + C = 8.0 s, Figure 7's best V100 time for 7B is 7.7 s); on A10 nodes a split one can.
* sequential (serverless vLLM): ready = F_end + c + k x S: V100 c 9.38 s, k 0.594 s/GB
  (7B 24.9 s, 13B 39.3 s; paper 23.2 / 38.6), A10 c 5.84 s, k 0.245 s/GB (7B 16.6 s, paper 16.6).
* serverlessllm: miss: ready = F_end + c + k x S (V100 9.87 s + 0.081 s/GB: 18.5 / 26.4 s, paper
  19.1 / 26.2; A10 6.75 s + 0.015 s/GB: 14.4 s, paper 14.1); hit in its host cache: t0 + c + k x S
  (V100 9.53 s + 0.205 s/GB: 12.3 / 14.9 s, paper 12.1 / 15.1; A10 6.09 + 0.153: 8.2 s, paper 8.1).

Serving on a p-stage group: prefill and each decode step take (1 + 0.05 (p - 1)) x the single
worker's time plus 1 ms per extra hop (the stages run one after another on one request; the
planner keeps HydraServe's more conservative p - a + a/p). A group batches 8 requests per
worker while pipelined (the artifact's Instance.batch_size = 8 x pp_size) and 8 per full worker
after consolidation (each full worker becomes an instance). Consolidation: the full workers
fetch the missing layers as low-priority NIC fetches (yielding to cold starts) and load them at
10 GB/s (PCIe); then the partial workers are freed and the group serves like one worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydraserve.contracts.plan import FunctionSpec

GB = 10**9
GOODPUT = 0.9


@dataclass(frozen=True)
class StageTimes:
    """Cold-start times of one GPU kind (fitted to Figure 7, see the module docstring)."""

    overlap_s: float
    tail_s: float
    tail_per_gb_s: float
    seq_const_s: float
    seq_per_gb_s: float
    sllm_miss_const_s: float
    sllm_miss_per_gb_s: float
    sllm_hit_const_s: float
    sllm_hit_per_gb_s: float


V100_TIMES = StageTimes(6.28, 1.73, 0.046, 9.38, 0.594, 9.87, 0.081, 9.53, 0.205)
A10_TIMES = StageTimes(4.64, 0.94, 0.003, 5.84, 0.245, 6.75, 0.015, 6.09, 0.153)
GPU_TIMES = {"v100": V100_TIMES, "a10": A10_TIMES}


@dataclass(frozen=True)
class ServingTimes:
    """What a running group costs: pipelining slowdown, consolidation load speed, batching."""

    pcie_gbps_bytes: float = 10.0  # GB/s host to device (consolidation loads)
    pipeline_overhead: float = 0.05  # per extra stage, on prefill and decode steps
    hop_s: float = 0.001  # per extra stage, per decode step


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: int
    gpu_memory_gb: float
    nic_gbps: float  # configured (what the planner is told)
    true_nic_gbps: float  # what the simulated NIC really does
    cache_gb: float  # host memory loaderd may keep models in
    gpu_kind: str = "v100"  # key of GPU_TIMES: which Figure 7 stage times apply


@dataclass(frozen=True)
class ModelKind:
    name: str
    size_gb: float
    layers: int
    embed_gb: float
    ttft_slo_s: float
    tpot_slo_s: float
    prefill_s: float
    tpot_s: float
    tpot_base_s: float  # the artifact's tpot_7b / tpot_13b: code and summarization TPOT SLO = 2x this


LLAMA2_7B = ModelKind("llama2-7b", 13.5, 32, 0.262, 7.5, 0.2, 0.15, 0.030, 0.042)
LLAMA2_13B = ModelKind("llama2-13b", 26.0, 40, 0.328, 12.0, 0.2, 0.25, 0.045, 0.058)


@dataclass
class SimSpec:
    nodes: list[NodeSpec]
    functions: list[FunctionSpec]
    times: ServingTimes = field(default_factory=ServingTimes)
    gpu_times: dict[str, StageTimes] = field(default_factory=lambda: dict(GPU_TIMES))
    keepalive_s: float = 30.0
    capacity: int = 8  # concurrent requests one worker batches (the artifact's Model.batch_size)
    output_tokens: int = 128
    # function indices in the order of HydraServe's model list (generate_trace.py: per application,
    # the 13B copies then the 7B copies), which its trace replay maps trace functions onto
    trace_order: list[int] = field(default_factory=list)


# HydraServe's end-to-end workload (artifact scripts/kubernetes/vllm/src/ModelInfo.py, MODEL_SET 3):
# three applications, each with 64 copies of Llama2-7B and of Llama2-13B; TTFT SLO 7.5 s / 12 s
# for chatbot and code, 5x that (37.5 s / 60 s) for summarization; TPOT SLO 200 ms for chatbot,
# 2 x 42 / 58 ms (84 / 116 ms for 7B / 13B) for code and summarization. Figure 9 reports the
# total attainment over all three (its figure9.py parses "total ttft violation").
# (name, TTFT SLO scale, TPOT SLO as a multiple of tpot_base_s or None for the model's default)
APPLICATIONS: tuple[tuple[str, float, float | None], ...] = (
    ("chatbot", 1.0, None), ("code", 1.0, 2.0), ("summarization", 5.0, 2.0))


def function_spec(kind: ModelKind, copy: int, app: str = "", slo_scale: float = 1.0,
                  tpot_scale: float | None = None) -> FunctionSpec:
    total = int(kind.size_gb * GB)
    emb = int(kind.embed_gb * GB)
    name = f"{app}-{kind.name}-{copy}" if app else f"{kind.name}-{copy}"
    tpot_slo = kind.tpot_slo_s if tpot_scale is None else round(kind.tpot_base_s * tpot_scale, 6)
    return FunctionSpec(name=name, model_uri=f"s3://models/{name}",
                        model_size_bytes=total, num_layers=kind.layers, embed_bytes=emb, head_bytes=emb,
                        ttft_slo_s=kind.ttft_slo_s * slo_scale, tpot_slo_s=tpot_slo, prefill_s=kind.prefill_s,
                        tpot_s=kind.tpot_s)


def paper_testbed(copies: int = 64, nic_skew: float = 1.0, skewed_nodes: int = 0, cache_gb: float = 96.0,
                  applications: bool = False) -> SimSpec:
    """Testbed (i): 4 x (4xV100 32 GB) + 4 x (1xA10 24 GB) at 16 Gbps; ``copies`` of 7B and 13B.

    ``applications``: ``copies`` of each model per application of APPLICATIONS (384 functions
    at 64), as HydraServe's end-to-end run deploys them; else one set (128 functions).

    ``skewed_nodes`` nodes really run at ``nic_skew`` x their configured bandwidth (a scenario
    for calibration: the static table is wrong for them).
    """
    nodes = []
    for i in range(8):
        gpus, mem, name = (4, 32.0, f"v100-{i}") if i < 4 else (1, 24.0, f"a10-{i - 4}")
        true = 16.0 * (nic_skew if i < skewed_nodes else 1.0)
        nodes.append(NodeSpec(name, gpus, mem, 16.0, true, cache_gb, "v100" if i < 4 else "a10"))
    kinds = (LLAMA2_7B, LLAMA2_13B)
    apps = APPLICATIONS if applications else (("", 1.0, None),)
    # Zipf ranks (the gamma workload) cycle over (application, model); the replay uses trace_order
    keys = [(c, a, k) for c in range(copies) for a in range(len(apps)) for k in range(len(kinds))]
    fns = [function_spec(kinds[k], c, *apps[a]) for c, a, k in keys]
    order = sorted(range(len(keys)), key=lambda i: (keys[i][1], -keys[i][2], keys[i][0]))
    return SimSpec(nodes=nodes, functions=fns, trace_order=order)


def scale_cluster(n_nodes: int, n_functions: int) -> SimSpec:
    """A large homogeneous cluster (4 x 32 GB GPUs per node) for the scale benchmark."""
    nodes = [NodeSpec(f"n{i}", 4, 32.0, 16.0, 16.0, 96.0) for i in range(n_nodes)]
    kinds = (LLAMA2_7B, LLAMA2_13B)
    fns = [function_spec(kinds[i % 2], i // 2) for i in range(n_functions)]
    return SimSpec(nodes=nodes, functions=fns)
