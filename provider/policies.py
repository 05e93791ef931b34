"""Named placement policies: the knobs that tell the planner which system it is imitating.

The planner, the service and the simulator take a Policy by name. `hydraserve` is HydraServe's
algorithm as its code has it (scripts/kubernetes/vllm/src/algs.py; docs/PLACEMENT.md, The decision); `ours` adds calibration, cache awareness and
peers; the rest are the paper's baselines. The simulator also reads ``startup`` to know which
cold-start mechanism the policy's system has (sequential, ServerlessLLM loading, overlapped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NodeChoice = Literal["first_fit", "locality", "fastest"]
Startup = Literal["sequential", "serverlessllm", "overlapped"]
Fallback = Literal["fastest_p1", "least_ttft", "cheapest_p1"]


@dataclass(frozen=True)
class Policy:
    name: str
    max_pipeline_size: int = 4
    node_choice: NodeChoice = "fastest"
    contention_aware: bool = True  # respect running fetches' deadlines, fair-share estimates
    cache_aware: bool = False  # count loaderd-resident bytes as already fetched
    keeps_cache: bool = False  # nodes keep fetched models in host memory (loaderd residency)
    calibrated: bool = False  # learn bandwidth and the start-up constant from reports
    peers: bool = False  # name peer loaderds holding the bytes as sources
    fallback: Fallback = "fastest_p1"
    startup: Startup = "overlapped"
    link_efficiency: float = 0.9  # HydraServe registers S x 8 / p / 0.9 bits per fetch
    # HydraServe checks the TPOT SLO only once it has profiled the function (algs.py: no check
    # while num_profile_points == 0, i.e. before a request ran on a one-stage instance)
    tpot_after_profile: bool = False
    description: str = ""


POLICIES: dict[str, Policy] = {p.name: p for p in [
    Policy("serverless-vllm", max_pipeline_size=1, node_choice="first_fit", contention_aware=False,
           startup="sequential", description="one worker, first node with memory, no overlap"),
    Policy("serverlessllm", max_pipeline_size=1, node_choice="locality", contention_aware=False,
           cache_aware=True, keeps_cache=True, startup="serverlessllm",
           description="one worker, prefer a node caching the checkpoint in host memory"),
    Policy("hydraserve", tpot_after_profile=True,
           description="HydraServe: SLO-driven p, static bandwidth, fetch + 2 s"),
    Policy("hydraserve-cache", cache_aware=True, keeps_cache=True, tpot_after_profile=True,
           description="HydraServe with loaderd residency counted as fetched"),
    Policy("ours", cache_aware=True, keeps_cache=True, calibrated=True, peers=True, fallback="cheapest_p1",
           description="HydraServe + calibrated bandwidth and start-up model + cache/peer awareness"),
]}

DEFAULT_POLICY = "ours"


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}") from None
