"""Split a model's decoder layers into p pipeline stages with balanced bytes.

Called by the planner for every pipeline size it weighs. Stage 0 also carries the embeddings and
the last stage the final norm and LM head (DESIGN.md §3), so those bytes count toward the first
and last stage. When hydraserve.weights.layout.balanced_stage_plan exists it should replace
``balanced_boundaries`` (same inputs); this copy keeps the planner free of that dependency.
"""

from __future__ import annotations

from functools import lru_cache

from hydraserve.contracts.stage import StagePlan


def balanced_boundaries(per_layer: tuple[int, ...], first_extra: int, last_extra: int, p: int) -> list[int]:
    """Layer boundaries [0, b1, ..., n] minimising the largest stage's bytes (every stage >= 1 layer).

    Binary search on the answer with a greedy feasibility check: O(n log total).
    """
    n = len(per_layer)
    if not 1 <= p <= n:
        raise ValueError(f"cannot split {n} layers into {p} stages")
    if p == 1:
        return [0, n]

    def cut(limit: int) -> list[int] | None:
        bounds = [0]
        load = first_extra
        count = 0
        for i, size in enumerate(per_layer):
            extra = last_extra if i == n - 1 else 0
            remaining_layers = n - i
            stages_left = p - len(bounds)  # stages still to open after the current one
            must_cut = remaining_layers <= stages_left  # each later stage needs >= 1 layer
            if count > 0 and (load + size + extra > limit or must_cut):
                bounds.append(i)
                load, count = 0, 0
                if len(bounds) > p:
                    return None
            load += size + extra
            count += 1
            if load > limit:
                return None
        bounds.append(n)
        return bounds if len(bounds) == p + 1 else None

    lo = max(max(per_layer), first_extra + per_layer[0], last_extra + per_layer[-1])
    hi = sum(per_layer) + first_extra + last_extra
    best = cut(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        got = cut(mid)
        if got is not None:
            best, hi = got, mid
        else:
            lo = mid + 1
    final = cut(lo) or best
    if final is None:  # pragma: no cover - cut(hi) always succeeds for p <= n
        raise RuntimeError("no split found")
    return final


@lru_cache(maxsize=4096)
def _cached(per_layer: tuple[int, ...], first_extra: int, last_extra: int, p: int) -> tuple[int, ...]:
    return tuple(balanced_boundaries(per_layer, first_extra, last_extra, p))


def balanced_stage_plan(per_layer: list[int], first_extra: int, last_extra: int, p: int) -> StagePlan:
    """The StagePlan for ``p`` stages (cached: the planner asks for the same splits again and again)."""
    bounds = _cached(tuple(per_layer), first_extra, last_extra, p)
    return StagePlan.from_boundaries(len(per_layer), list(bounds))


def stage_bytes(per_layer: list[int], first_extra: int, last_extra: int, plan: StagePlan) -> list[int]:
    """Bytes each stage of ``plan`` holds."""
    out = []
    for st in plan.stages:
        size = sum(per_layer[st.layer_start:st.layer_end])
        if st.is_first:
            size += first_extra
        if st.is_last:
            size += last_extra
        out.append(size)
    return out
