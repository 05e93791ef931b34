"""Which checkpoint tensors a stage needs, and which of our parameters each one becomes.

Called by loader.py (to assign tensors) and by anything that prefetches a stage's bytes
(loaderd, the S3 tensor source) through ``stage_tensor_names``. Maps are ordered embeddings,
then layers in order, then final norm + head, so a streaming source delivers what the
loader wants next. Tied LM heads map to the token-embedding tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

from hydraserve.contracts.stage import StageSpec
from hydraserve.runtime.model.config import ModelConfig

# our per-layer parameter -> checkpoint suffix under the layer prefix
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_LLAMA_QKV_BIAS = {f"attn.w{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}
_LLAMA_MLP_BIAS = {f"mlp.{x}.bias": f"mlp.{x}_proj.bias" for x in ("gate", "up", "down")}
_OPT_LAYER = {
    "attn_norm.weight": "self_attn_layer_norm.weight",
    "attn_norm.bias": "self_attn_layer_norm.bias",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.out_proj.weight",
    "mlp_norm.weight": "final_layer_norm.weight",
    "mlp_norm.bias": "final_layer_norm.bias",
    "fc1.weight": "fc1.weight",
    "fc2.weight": "fc2.weight",
}
_OPT_BIAS = {
    "attn.wq.bias": "self_attn.q_proj.bias", "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.bias": "self_attn.v_proj.bias", "attn.wo.bias": "self_attn.out_proj.bias",
    "fc1.bias": "fc1.bias", "fc2.bias": "fc2.bias",
}


def layer_param_map(cfg: ModelConfig, layer: int) -> dict[str, str]:
    """Our parameter name -> checkpoint name for one decoder layer."""
    if cfg.family == "llama":
        table = dict(_LLAMA_LAYER)
        if cfg.qkv_bias:
            table.update(_LLAMA_QKV_BIAS)
        if cfg.o_bias:
            table["attn.wo.bias"] = "self_attn.o_proj.bias"
        if cfg.mlp_bias:
            table.update(_LLAMA_MLP_BIAS)
        prefix = f"model.layers.{layer}."
    else:
        table = dict(_OPT_LAYER)
        if cfg.enable_bias:
            table.update(_OPT_BIAS)
        prefix = f"model.decoder.layers.{layer}."
    return {f"layers.{layer}.{ours}": prefix + theirs for ours, theirs in table.items()}


def stage_param_map(cfg: ModelConfig, stage: StageSpec) -> dict[str, str]:
    """Every parameter of ``stage`` -> its checkpoint tensor name, in load order."""
    out: dict[str, str] = {}
    projected = cfg.word_embed_proj_dim != cfg.hidden_size
    embed = "model.embed_tokens.weight" if cfg.family == "llama" else "model.decoder.embed_tokens.weight"
    if stage.is_first:
        out["embed.weight"] = embed
        if cfg.family == "opt":
            out["pos_embed.weight"] = "model.decoder.embed_positions.weight"
            if projected:
                out["project_in.weight"] = "model.decoder.project_in.weight"
    for layer in range(stage.layer_start, stage.layer_end):
        out.update(layer_param_map(cfg, layer))
    if stage.is_last:
        if cfg.family == "llama":
            out["norm.weight"] = "model.norm.weight"
        else:
            if cfg.final_layer_norm:
                out["final_norm.weight"] = "model.decoder.final_layer_norm.weight"
                out["final_norm.bias"] = "model.decoder.final_layer_norm.bias"
            if projected:
                out["project_out.weight"] = "model.decoder.project_out.weight"
        out["head.weight"] = embed if cfg.tie_word_embeddings else "lm_head.weight"
    return out


def stage_tensor_names(cfg: ModelConfig, stage: StageSpec | None = None) -> list[str]:
    """Checkpoint tensor names ``stage`` (default: the whole model) needs, without duplicates."""
    stage = stage or StageSpec.whole(cfg.num_layers)
    return list(dict.fromkeys(stage_param_map(cfg, stage).values()))


def resolve(name: str, available: Iterable[str] | set[str]) -> str:
    """The checkpoint's spelling of ``name``: as is, without the ``model.`` prefix (old OPT
    checkpoints), or for a missing ``lm_head.weight`` the embeddings it is silently tied to."""
    names = available if isinstance(available, set) else set(available)
    candidates = [name, name.removeprefix("model.")]
    if name == "lm_head.weight":
        candidates += ["model.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                       "decoder.embed_tokens.weight"]
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise KeyError(f"checkpoint has no tensor {name!r}")
