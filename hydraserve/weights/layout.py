"""Tensor names -> roles (embedding, decoder layer i, final norm, head) and stage slicing.

Knows the checkpoint naming of the llama family (``model.layers.{i}.``, ``model.embed_tokens``,
``model.norm``, ``lm_head``) and of OPT (``model.decoder.layers.{i}.``,
``model.decoder.embed_tokens``, ``model.decoder.embed_positions``,
``model.decoder.final_layer_norm``, ``model.decoder.project_in/out``, ``lm_head`` absent when
tied). Callers: the placement service (:func:`stage_byte_profile` + :func:`balanced_stage_plan`
choose layer ranges), loaderd and the S3 tensor source (:func:`names_for_stage`,
:func:`order_for_streaming` decide what to fetch and in which order), the runtime's loader.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, TypeVar

from hydraserve.contracts.stage import MAX_PIPELINE_SIZE, StagePlan, StageSpec


class Role(StrEnum):
    EMBEDDING = "embedding"
    POSITION_EMBEDDING = "position_embedding"
    PROJECT_IN = "project_in"
    LAYER = "layer"
    FINAL_NORM = "final_norm"
    PROJECT_OUT = "project_out"
    LM_HEAD = "lm_head"
    OTHER = "other"  # unknown non-layer tensors (e.g. rotary buffers): every stage gets them


FIRST_STAGE_ROLES = frozenset({Role.EMBEDDING, Role.POSITION_EMBEDDING, Role.PROJECT_IN})
LAST_STAGE_ROLES = frozenset({Role.FINAL_NORM, Role.PROJECT_OUT, Role.LM_HEAD})


@dataclass(frozen=True)
class TensorRole:
    role: Role
    layer: int | None = None


_LAYER_RE = re.compile(r"^(?:model\.decoder\.layers|model\.layers)\.(\d+)\.")
_FIXED: list[tuple[str, Role]] = [
    ("model.embed_tokens.", Role.EMBEDDING),
    ("model.decoder.embed_tokens.", Role.EMBEDDING),
    ("model.decoder.embed_positions.", Role.POSITION_EMBEDDING),
    ("model.decoder.project_in.", Role.PROJECT_IN),
    ("model.norm.", Role.FINAL_NORM),
    ("model.decoder.final_layer_norm.", Role.FINAL_NORM),
    ("model.decoder.project_out.", Role.PROJECT_OUT),
    ("lm_head.", Role.LM_HEAD),
]


def role_of(name: str) -> TensorRole:
    """The role of one checkpoint tensor (``Role.OTHER`` if the name is not recognised)."""
    match = _LAYER_RE.match(name)
    if match:
        return TensorRole(Role.LAYER, int(match.group(1)))
    for prefix, role in _FIXED:
        if name.startswith(prefix):
            return TensorRole(role)
    return TensorRole(Role.OTHER)


def num_layers_in(names: Iterable[str]) -> int:
    """1 + the highest decoder layer index among ``names`` (0 if there are none)."""
    layers = [r.layer for r in map(role_of, names) if r.layer is not None]
    return max(layers) + 1 if layers else 0


def names_for_stage(names: Iterable[str], stage: StageSpec, tie_word_embeddings: bool) -> list[str]:
    """The tensors stage ``stage`` needs, in the order given.

    Stage 0 gets the embeddings (and OPT's position embeddings and project_in); the last stage
    the final norm, project_out and lm_head; with tied embeddings and no ``lm_head`` tensor the
    last stage also gets the token embedding (it is the head's weight).
    """
    names = list(names)
    roles = {n: role_of(n) for n in names}
    has_head = any(r.role is Role.LM_HEAD for r in roles.values())
    needs_embedding_as_head = stage.is_last and (tie_word_embeddings or not has_head)
    selected = []
    for name in names:
        r = roles[name]
        if r.role is Role.LAYER:
            keep = r.layer is not None and stage.layer_start <= r.layer < stage.layer_end
        elif r.role in FIRST_STAGE_ROLES:
            keep = stage.is_first or (r.role is Role.EMBEDDING and needs_embedding_as_head)
        elif r.role in LAST_STAGE_ROLES:
            keep = stage.is_last
        else:
            keep = True
        if keep:
            selected.append(name)
    return selected


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound="str | _Named")


def stream_rank(name: str) -> tuple[int, int]:
    """Sort key of a tensor for streaming: (0, 0) embeddings, (1, i) layer i, (2, 0) head."""
    r = role_of(name)
    if r.role in FIRST_STAGE_ROLES or r.role is Role.OTHER:
        return (0, 0)
    if r.role is Role.LAYER:
        return (1, r.layer or 0)
    return (2, 0)


def order_for_streaming(entries: Sequence[N]) -> list[N]:
    """Entries (names or objects with ``.name``) in the order a loader consumes them:
    embeddings first, then decoder layers 0, 1, ..., then the final norm and head; file order
    within each group (stable sort).
    """
    def key(entry: N) -> tuple[int, int]:
        return stream_rank(entry if isinstance(entry, str) else entry.name)

    return sorted(entries, key=key)


@dataclass(frozen=True)
class StageByteProfile:
    """Bytes per decoder layer, plus the bytes only the first / last stage holds."""

    per_layer_bytes: list[int]
    first_extra_bytes: int
    last_extra_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.per_layer_bytes) + self.first_extra_bytes + self.last_extra_bytes


def stage_byte_profile(sizes: Mapping[str, int], tie_word_embeddings: bool) -> StageByteProfile:
    """Group tensor sizes (name -> bytes) by layer; embeddings count for the first stage and the
    head for the last (with tied embeddings the last stage holds the embedding too)."""
    per_layer = [0] * num_layers_in(sizes)
    first = last = embedding = 0
    has_head = False
    for name, nbytes in sizes.items():
        r = role_of(name)
        if r.role is Role.LAYER and r.layer is not None:
            per_layer[r.layer] += nbytes
        elif r.role in FIRST_STAGE_ROLES:
            first += nbytes
            embedding += nbytes if r.role is Role.EMBEDDING else 0
        elif r.role in LAST_STAGE_ROLES:
            last += nbytes
            has_head = has_head or r.role is Role.LM_HEAD
        else:
            first += nbytes
    if tie_word_embeddings or not has_head:
        last += embedding
    return StageByteProfile(per_layer, first, last)


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
