"""Shared builders for placement tests: the paper's testbed-(i) nodes and Llama2 function specs."""

from __future__ import annotations

from hydraserve.contracts.plan import FunctionSpec, NodeInfo

GB = 10**9


def paper_nodes(nic_gbps: float = 16.0) -> list[NodeInfo]:
    """4 nodes of 4xV100 32 GB and 4 nodes of 1xA10 24 GB (HydraServe testbed i)."""
    return ([NodeInfo(name=f"v100-{i}", gpus=4, gpu_memory_gb=32, nic_gbps=nic_gbps) for i in range(4)]
            + [NodeInfo(name=f"a10-{i}", gpus=1, gpu_memory_gb=24, nic_gbps=nic_gbps) for i in range(4)])


def llama(name: str = "llama7b", size_gb: float = 13.5, layers: int = 32, ttft_slo_s: float = 7.5,
          uri: str | None = None, **kw: object) -> FunctionSpec:
    return FunctionSpec(name=name, model_uri=uri or f"s3://models/{name}", model_size_bytes=int(size_gb * GB),
                        num_layers=layers, embed_bytes=262_144_000, head_bytes=262_144_000,
                        ttft_slo_s=ttft_slo_s, tpot_slo_s=0.2, **kw)  # type: ignore[arg-type]
