"""ModelConfig: the one description of a decoder the model code needs, parsed from HF config.json.

Called by the loader and the engine factory. Supports the Llama family (llama, mistral, qwen2:
RMSNorm + RoPE + SwiGLU) and OPT, the families hydraserve.weights.architectures names (the
checkpoint naming lives there; ``architecture`` carries it); anything else raises
UnsupportedModelError naming the model_type. Derived sizes are computed after construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from hydraserve.errors import UnsupportedModelError
from hydraserve.weights.architectures import FAMILIES, Architecture, compact_engine_runs

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPE_NAMES = ("float32", "bfloat16", "float16")

__all__ = ["ModelConfig", "UnsupportedModelError"]


@dataclass
class ModelConfig:
    """Sizes and options of one decoder-only model. ``family`` selects the network code."""

    family: Literal["llama", "opt"]
    model_type: str
    architecture: Architecture  # checkpoint naming: which tensor is which part, tied head or not
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    dtype: str = "float32"
    head_dim: int = 0  # 0: hidden_size // num_heads
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # llama family
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor": ...}
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # OPT
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = 0  # 0: hidden_size
    enable_bias: bool = True
    final_layer_norm: bool = True

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.word_embed_proj_dim == 0:
            self.word_embed_proj_dim = self.hidden_size
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                f"{self.num_kv_heads}")
        if self.dtype not in DTYPE_NAMES:
            raise UnsupportedModelError(f"unsupported checkpoint dtype {self.dtype!r}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_hf(json.loads(text))

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Parse a Hugging Face config.json dict (transformers 4.x and 5.x spellings)."""
        model_type = str(hf.get("model_type", ""))
        if not compact_engine_runs(model_type):
            raise UnsupportedModelError(f"our compact engine does not run model_type {model_type!r} (it runs "
                                        f"{', '.join(sorted(t for f in FAMILIES for t in f.model_types))})",
                                        param="model")
        architecture = Architecture.from_config(hf)
        dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").removeprefix("torch.")
        eos = hf.get("eos_token_id")
        eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])
        common: dict[str, Any] = dict(
            model_type=model_type, architecture=architecture, tie_word_embeddings=architecture.tie_word_embeddings,
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)), dtype=dtype,
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
        )
        return cls._llama(hf, common) if architecture.family.name == "llama" else cls._opt(hf, common)

    @classmethod
    def _llama(cls, hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {hf.get('hidden_act')!r}")
        if hf.get("use_sliding_window") and hf.get("sliding_window"):
            raise UnsupportedModelError("sliding-window attention is not supported")
        window = hf.get("sliding_window") if common["model_type"] == "mistral" else None
        if window:  # full attention is exact while the context fits the window: cap it there
            common["max_position_embeddings"] = min(common["max_position_embeddings"], int(window))
        # transformers 5 nests rope_theta and the scaling in rope_parameters; 4.x has both on top.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"unsupported rope type {rope_type!r}")
        qkv_bias = bool(hf.get("attention_bias", False)) or common["model_type"] == "qwen2"
        return cls(
            family="llama",
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            intermediate_size=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            head_dim=int(hf.get("head_dim") or 0),
            rope_theta=theta,
            rope_scaling={**rope, "rope_type": rope_type} if rope_type != "default" else None,
            qkv_bias=qkv_bias,
            o_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            **common,
        )

    @classmethod
    def _opt(cls, hf: dict[str, Any], common: dict[str, Any]) -> ModelConfig:
        if hf.get("activation_function", "relu") != "relu":
            raise UnsupportedModelError(f"unsupported OPT activation {hf.get('activation_function')!r}")
        if not hf.get("layer_norm_elementwise_affine", True):
            raise UnsupportedModelError("OPT without elementwise-affine layer norms is not supported")
        pre_ln = bool(hf.get("do_layer_norm_before", True))
        return cls(
            family="opt",
            num_kv_heads=int(hf["num_attention_heads"]),
            intermediate_size=int(hf["ffn_dim"]),
            norm_eps=1e-5,
            do_layer_norm_before=pre_ln,
            word_embed_proj_dim=int(hf.get("word_embed_proj_dim") or hf["hidden_size"]),
            enable_bias=bool(hf.get("enable_bias", True)),
            final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
            **common,
        )
