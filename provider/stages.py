"""Stage splits for the planner: hydraserve.weights.layout's byte-balanced split, cached.

Called by the planner for every pipeline size it weighs, so the same (layer sizes, p) comes
back again and again; the split itself (stage 0 counts the embeddings, the last stage the head,
exact min-max by dynamic programming) is the one loaderd and the runtime use.
"""

from __future__ import annotations

from functools import lru_cache

from hydraserve.contracts.stage import StagePlan
from hydraserve.weights.layout import balanced_stage_plan as _layout_split


@lru_cache(maxsize=4096)
def _cached(per_layer: tuple[int, ...], first_extra: int, last_extra: int, p: int) -> StagePlan:
    return _layout_split(per_layer, first_extra, last_extra, p)


def balanced_boundaries(per_layer: tuple[int, ...], first_extra: int, last_extra: int, p: int) -> list[int]:
    """Layer boundaries [0, b1, ..., n] of the balanced split."""
    plan = _cached(tuple(per_layer), first_extra, last_extra, p)
    return [s.layer_start for s in plan.stages] + [plan.num_layers]


def balanced_stage_plan(per_layer: list[int], first_extra: int, last_extra: int, p: int) -> StagePlan:
    """The StagePlan for ``p`` stages (StagePlan is frozen, so sharing the cached one is safe)."""
    return _cached(tuple(per_layer), first_extra, last_extra, p)


def stage_bytes(per_layer: list[int], first_extra: int, last_extra: int, plan: StagePlan,
                tied: int = 0) -> list[int]:
    """Bytes each stage of ``plan`` holds (a stage that is first and last holds the ``tied``
    embedding, counted in both extras, once), as the stage slicer decides them."""
    out = []
    for st in plan.stages:
        size = sum(per_layer[st.layer_start:st.layer_end])
        if st.is_first:
            size += first_extra
        if st.is_last:
            size += last_extra
        if st.is_first and st.is_last:
            size -= tied
        out.append(size)
    return out
