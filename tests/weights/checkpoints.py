"""Small safetensors checkpoints in the HF layout, written with safetensors itself (tests only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def llama_tensors(layers: int = 4, hidden: int = 32, vocab: int = 128, inter: int = 64,
                  dtype: torch.dtype = torch.float32, tie: bool = False, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    t = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": rnd(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": rnd(hidden, hidden),
              p + "self_attn.k_proj.weight": rnd(hidden // 2, hidden),
              p + "self_attn.v_proj.weight": rnd(hidden // 2, hidden),
              p + "self_attn.o_proj.weight": rnd(hidden, hidden),
              p + "mlp.gate_proj.weight": rnd(inter, hidden),
              p + "mlp.up_proj.weight": rnd(inter, hidden),
              p + "mlp.down_proj.weight": rnd(hidden, inter),
              p + "input_layernorm.weight": rnd(hidden),
              p + "post_attention_layernorm.weight": rnd(hidden)}
    if not tie:
        t["lm_head.weight"] = rnd(vocab, hidden)
    return t


def opt_tensors(layers: int = 3, hidden: int = 32, vocab: int = 128, project: bool = False,
                seed: int = 1) -> dict[str, torch.Tensor]:
    """OPT with tied embeddings (no lm_head tensor); ``project`` adds project_in/out."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float16)

    word = hidden // 2 if project else hidden
    t = {"model.decoder.embed_tokens.weight": rnd(vocab, word),
         "model.decoder.embed_positions.weight": rnd(66, hidden),
         "model.decoder.final_layer_norm.weight": rnd(hidden),
         "model.decoder.final_layer_norm.bias": rnd(hidden)}
    if project:
        t["model.decoder.project_in.weight"] = rnd(hidden, word)
        t["model.decoder.project_out.weight"] = rnd(word, hidden)
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{m}.weight"] = rnd(hidden, hidden)
            t[p + f"self_attn.{m}.bias"] = rnd(hidden)
        t[p + "fc1.weight"] = rnd(2 * hidden, hidden)
        t[p + "fc2.weight"] = rnd(hidden, 2 * hidden)
        t[p + "self_attn_layer_norm.weight"] = rnd(hidden)
        t[p + "final_layer_norm.weight"] = rnd(hidden)
    return t


def write_model(out: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
                config: dict | None = None) -> Path:
    """config.json, tokenizer.json and the weights (sharded with an index when shards > 1)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config or {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (out / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {}}}))
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"))
        return out
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(out / fname))
        weight_map |= dict.fromkeys(part, fname)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out
