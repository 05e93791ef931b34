"""The stage slicer: which checkpoint tensors a pipeline stage holds, in the order to stream them.

:func:`stage_parameters` is the one decision of what a stage holds, used by loaderd (what to
prefetch and serve), the runtime (what to load, into which parameter) and, through
:func:`stage_byte_profile`, the placement service's byte counts. Stage 0 holds the embeddings
(and OPT's positions and project_in), stage s decoder layers [a_s, b_s), the last stage the
final norm, project_out and the LM head; when the head is tied to the token embedding (config
says so, or the checkpoint has no lm_head) the last stage holds the embedding as its head, the
only tensor two stages share. Names come from hydraserve.weights.architectures, which refuses
tensors it does not know. Also here: segment groups in streaming order, and the byte-balanced
split of layers into p stages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from hydraserve.contracts.stage import MAX_PIPELINE_SIZE, StagePlan, StageSpec
from hydraserve.weights.architectures import HEAD_PARAM, Architecture, Part, TensorRole

HEAD_ORDER = 1_000_000  # segment order of the final norm + head group (after any layer)


def stream_rank(role: TensorRole) -> int:
    """Streaming order of a tensor's group: embeddings first, then layers 0, 1, ..., then the head."""
    if role.part in (Part.EMBEDDING, Part.FIRST):
        return 0
    if role.part is Part.LAYER:
        return 1 + (role.layer or 0)
    return HEAD_ORDER


def segment_group(role: TensorRole) -> tuple[int, str]:
    """The loaderd segment group of a tensor and the group's streaming order: "embed",
    "layer.<i>" or "head" (a stage is a set of whole groups, so stages share segments)."""
    order = stream_rank(role)
    if role.part is Part.LAYER:
        return order, f"layer.{role.layer}"
    return order, "embed" if order == 0 else "head"


def head_is_embedding(names: Iterable[str], arch: Architecture) -> bool:
    """Whether the LM head is the token embedding: config says tied, or there is no lm_head."""
    return arch.tie_word_embeddings or not any(arch.role(n).part is Part.HEAD for n in names)


def stage_parameters(names: Iterable[str], stage: StageSpec, arch: Architecture) -> dict[str, tuple[str, ...]]:
    """Every checkpoint tensor ``stage`` holds -> the parameters of our model it fills, in
    streaming order (file order within a group). ``names`` is the whole checkpoint's tensors."""
    names = list(names)
    roles = {n: arch.role(n) for n in names}  # refuses unknown names before anything is chosen
    tied = head_is_embedding(names, arch)
    held: list[tuple[str, tuple[str, ...]]] = []
    for name, role in roles.items():
        params: tuple[str, ...] = ()
        if role.part is Part.LAYER:
            assert role.layer is not None
            if stage.layer_start <= role.layer < stage.layer_end:
                params = (role.param,)
        elif role.part is Part.EMBEDDING:
            params = ((role.param,) if stage.is_first else ()) + ((HEAD_PARAM,) if stage.is_last and tied else ())
        elif role.part is Part.FIRST:
            params = (role.param,) if stage.is_first else ()
        elif role.part in (Part.LAST, Part.HEAD):
            params = (role.param,) if stage.is_last else ()
        if params:
            held.append((name, params))
    held.sort(key=lambda item: stream_rank(roles[item[0]]))  # stable: file order within a group
    return dict(held)


def stage_tensors(names: Iterable[str], stage: StageSpec, arch: Architecture) -> list[str]:
    """The checkpoint tensors ``stage`` holds, in streaming order (see :func:`stage_parameters`)."""
    return list(stage_parameters(names, stage, arch))


def num_layers_in(names: Iterable[str], arch: Architecture) -> int:
    """1 + the highest decoder layer among ``names`` (0 if there are none)."""
    layers = [r.layer for r in map(arch.role, names) if r.part is Part.LAYER and r.layer is not None]
    return max(layers) + 1 if layers else 0


@dataclass(frozen=True)
class StageByteProfile:
    """Bytes per decoder layer, plus the bytes only the first / last stage holds. With a tied
    head both extras count the embedding (``tied_bytes``): a one-stage model holds it once."""

    per_layer_bytes: list[int]
    first_extra_bytes: int
    last_extra_bytes: int
    tied_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.per_layer_bytes) + self.first_extra_bytes + self.last_extra_bytes - self.tied_bytes


def stage_byte_profile(sizes: Mapping[str, int], arch: Architecture) -> StageByteProfile:
    """Tensor sizes (name -> bytes) as the planner counts them, by the slicer's rules."""
    n = num_layers_in(sizes, arch)
    whole = StageSpec.whole(max(n, 1))
    per_layer = [0] * n
    first = last = tied = 0
    for name, params in stage_parameters(sizes, whole, arch).items():
        role = arch.role(name)
        if role.part is Part.LAYER:
            assert role.layer is not None
            per_layer[role.layer] += sizes[name]
            continue
        if role.part in (Part.EMBEDDING, Part.FIRST) and params[0] != HEAD_PARAM:
            first += sizes[name]
        if role.part in (Part.LAST, Part.HEAD) or HEAD_PARAM in params:
            last += sizes[name]
        if len(params) == 2:  # the tied embedding: stage 0's input and the last stage's head
            tied += sizes[name]
    return StageByteProfile(per_layer, first, last, tied)


def balanced_stage_plan(per_layer_bytes: Sequence[int], first_extra_bytes: int,
                        last_extra_bytes: int, p: int) -> StagePlan:
    """Split layers into ``p`` contiguous stages minimising the largest stage's bytes.

    HydraServe balances bytes, not layer counts: the embedding counts toward stage 0 and the
    LM head toward the last stage, so those stages get fewer layers. Exact min-max partition
    by dynamic programming (layers <= a few hundred, p <= 4); every stage has >= 1 layer;
    ties go to the split with earlier boundaries.
    """
    n = len(per_layer_bytes)
    if not 1 <= p <= MAX_PIPELINE_SIZE:
        raise ValueError(f"pipeline size {p} not in 1..{MAX_PIPELINE_SIZE}")
    if n < p:
        raise ValueError(f"cannot split {n} layers into {p} stages")
    prefix = [0]
    for b in per_layer_bytes:
        prefix.append(prefix[-1] + b)

    def cost(stage: int, a: int, b: int) -> int:
        extra = (first_extra_bytes if stage == 0 else 0) + (last_extra_bytes if stage == p - 1 else 0)
        return prefix[b] - prefix[a] + extra

    inf = float("inf")
    # best[s][b]: min over splits of layers [0, b) into stages 0..s of the largest stage cost
    best = [[inf] * (n + 1) for _ in range(p)]
    cut = [[0] * (n + 1) for _ in range(p)]
    for b in range(1, n + 1):
        best[0][b] = cost(0, 0, b)
    for s in range(1, p):
        for b in range(s + 1, n + 1):
            for a in range(s, b):
                value = max(best[s - 1][a], cost(s, a, b))
                if value < best[s][b]:
                    best[s][b], cut[s][b] = value, a
    boundaries = [n]
    for s in range(p - 1, 0, -1):
        boundaries.append(cut[s][boundaries[-1]])
    boundaries.append(0)
    return StagePlan.from_boundaries(n, boundaries[::-1])
