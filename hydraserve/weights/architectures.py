"""Each architecture's checkpoint naming: which tensor is which part of the network.

The stage slicer (hydraserve.weights.layout) reads the part of the network each tensor
belongs to (embeddings, decoder layer i, final norm, head). Two kinds of naming:
- a table per family our compact engine runs (the Llama family: llama, mistral, qwen2; OPT),
  which also names the parameter of our model each tensor becomes (its modules are named
  after this table, so slicing and loading cannot disagree);
- for every other architecture (vLLM serves them), the conventions Hugging Face checkpoints
  share: decoder layers under ``...layers.<i>.`` or ``...h.<i>.``, token embeddings
  (``embed_tokens``, ``wte``, ``embed_in``), other first-stage tensors (``wpe``,
  ``embed_positions``), the final norm (``norm``, ``ln_f``, ``final_layer_norm``) and the
  head (``lm_head``, ``embed_out``). These carry no parameter of ours.
A name neither knows is an UnsupportedModelError naming the tensor and the architecture: a
checkpoint we do not understand is refused, never sliced half right.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from hydraserve.errors import UnsupportedModelError


class Part(StrEnum):
    EMBEDDING = "embedding"  # token embeddings: stage 0, and the last stage when the head is tied
    FIRST = "first"  # other tensors only stage 0 holds (OPT's positions and project_in)
    LAYER = "layer"  # decoder layer ``layer``
    LAST = "last"  # tensors only the last stage holds (final norm, OPT's project_out)
    HEAD = "head"  # the LM head (the last stage), when it is not tied to the embeddings
    UNUSED = "unused"  # in some checkpoints, loaded by nobody (rotary inv_freq, a tied lm_head)


HEAD_PARAM = "head.weight"
HEAD_TENSOR = "lm_head.weight"
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class TensorRole:
    """Where a checkpoint tensor belongs and which parameter of our model it fills."""

    part: Part
    layer: int | None = None
    param: str = ""  # "" for unused tensors


@dataclass(frozen=True)
class Family:
    """The checkpoint naming of one architecture family."""

    name: str
    model_types: frozenset[str]
    root: str  # prefix of every tensor but the LM head ("model.", "model.decoder.")
    fixed: Mapping[str, tuple[Part, str]]  # name under root -> (part, our parameter)
    layer_params: Mapping[str, str]  # name under root + "layers.{i}." -> our name under "layers.{i}."
    unused_layer_tensors: frozenset[str] = frozenset()
    tie_by_default: bool = False  # config.json's tie_word_embeddings when it does not say


def _linear(ours: str, theirs: str) -> dict[str, str]:
    return {f"{theirs}.weight": f"{ours}.weight", f"{theirs}.bias": f"{ours}.bias"}


LLAMA = Family(
    name="llama", model_types=frozenset({"llama", "mistral", "qwen2"}), root="model.",
    fixed={"embed_tokens.weight": (Part.EMBEDDING, "embed.weight"), "norm.weight": (Part.LAST, "norm.weight")},
    layer_params={
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "mlp_norm.weight",
        **_linear("attn.wq", "self_attn.q_proj"), **_linear("attn.wk", "self_attn.k_proj"),
        **_linear("attn.wv", "self_attn.v_proj"), **_linear("attn.wo", "self_attn.o_proj"),
        **_linear("mlp.gate", "mlp.gate_proj"), **_linear("mlp.up", "mlp.up_proj"),
        **_linear("mlp.down", "mlp.down_proj"),
    },
    unused_layer_tensors=frozenset({"self_attn.rotary_emb.inv_freq"}),
)

OPT = Family(
    name="opt", model_types=frozenset({"opt"}), root="model.decoder.",
    fixed={
        "embed_tokens.weight": (Part.EMBEDDING, "embed.weight"),
        "embed_positions.weight": (Part.FIRST, "pos_embed.weight"),
        "project_in.weight": (Part.FIRST, "project_in.weight"),
        "final_layer_norm.weight": (Part.LAST, "final_norm.weight"),
        "final_layer_norm.bias": (Part.LAST, "final_norm.bias"),
        "project_out.weight": (Part.LAST, "project_out.weight"),
    },
    layer_params={
        **_linear("attn_norm", "self_attn_layer_norm"), **_linear("mlp_norm", "final_layer_norm"),
        **_linear("attn.wq", "self_attn.q_proj"), **_linear("attn.wk", "self_attn.k_proj"),
        **_linear("attn.wv", "self_attn.v_proj"), **_linear("attn.wo", "self_attn.out_proj"),
        **_linear("fc1", "fc1"), **_linear("fc2", "fc2"),
    },
    tie_by_default=True,
)

FAMILIES = (LLAMA, OPT)
# Any other architecture: Hugging Face's shared conventions (no parameters of ours).
GENERIC = Family(name="generic", model_types=frozenset(), root="", fixed={}, layer_params={})
_GENERIC_LAYER = re.compile(r"(?:^|.*\.)(?:layers|h|blocks)\.(\d+)\..+")
_GENERIC_PARTS: tuple[tuple[re.Pattern[str], Part], ...] = tuple(
    (re.compile(rf"(?:^|.*\.){pattern}\.(?:weight|bias)"), part) for pattern, part in (
        (r"(?:embed_tokens|wte|embed_in|word_embeddings)", Part.EMBEDDING),
        (r"(?:wpe|embed_positions|project_in)", Part.FIRST),
        (r"(?:norm|ln_f|final_layer_norm|final_layernorm|project_out)", Part.LAST),
        (r"(?:lm_head|embed_out)", Part.HEAD),
    ))


def family_of(model_type: str) -> Family:
    """The family of a config.json ``model_type``: a table of ours, else the generic naming."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC


def compact_engine_runs(model_type: str) -> bool:
    """Whether our compact engine has the modules of this architecture (a family table)."""
    return family_of(model_type) is not GENERIC


@dataclass(frozen=True)
class Architecture:
    """One model's naming: its family, model_type and whether its LM head is the embedding."""

    family: Family
    model_type: str
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Architecture:
        """From a parsed config.json."""
        model_type = str(config.get("model_type", ""))
        family = family_of(model_type)
        tie = config.get("tie_word_embeddings")
        return cls(family, model_type, family.tie_by_default if tie is None else bool(tie))

    def role(self, name: str) -> TensorRole:
        """The role of checkpoint tensor ``name``; UnsupportedModelError if this architecture has none."""
        if name == HEAD_TENSOR:
            return TensorRole(Part.UNUSED) if self.tie_word_embeddings else TensorRole(Part.HEAD, param=HEAD_PARAM)
        if self.family is GENERIC:
            return self._generic_role(name)
        rest = self._under_root(name)
        if rest is not None:
            fixed = self.family.fixed.get(rest)
            if fixed is not None:
                return TensorRole(fixed[0], param=fixed[1])
            match = _LAYER.fullmatch(rest)
            if match is not None:
                layer, suffix = int(match.group(1)), match.group(2)
                ours = self.family.layer_params.get(suffix)
                if ours is not None:
                    return TensorRole(Part.LAYER, layer, f"layers.{layer}.{ours}")
                if suffix in self.family.unused_layer_tensors:
                    return TensorRole(Part.UNUSED, layer)
        raise UnsupportedModelError(
            f"tensor {name!r} is not part of the {self.family.name} architecture (model_type "
            f"{self.model_type!r}): this runtime does not know where it belongs", param="model")

    def _generic_role(self, name: str) -> TensorRole:
        match = _GENERIC_LAYER.fullmatch(name)
        if match is not None:
            return TensorRole(Part.LAYER, int(match.group(1)))
        for pattern, part in _GENERIC_PARTS:
            if pattern.fullmatch(name):
                if part is Part.HEAD and self.tie_word_embeddings:
                    return TensorRole(Part.UNUSED)
                return TensorRole(part)
        raise UnsupportedModelError(
            f"tensor {name!r} of model_type {self.model_type!r} is neither a decoder layer nor an embedding, "
            "final norm or head by Hugging Face's naming: the stage slicer does not know where it belongs",
            param="model")

    def _under_root(self, name: str) -> str | None:
        """``name`` without the family's root; old checkpoints omit its leading "model."."""
        root = self.family.root
        for prefix in (root, root.removeprefix("model.")):
            if name.startswith(prefix):
                return name[len(prefix):]
        return None
