"""The Llama-family decoder (Llama 1/2/3, Mistral without sliding window, Qwen2) as a stage.

Built by loader.py from a ModelConfig and a StageSpec. RMSNorm, RoPE (default, linear or
Llama-3 scaling), grouped-query attention, SwiGLU MLP, tied or untied LM head, optional q/k/v
bias (Qwen2). Parameter names are ours; hydraserve.weights.architectures maps checkpoint names to them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hydraserve.contracts.stage import StageSpec
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.layers import (
    Attention,
    KVCacheLike,
    RMSNorm,
    StageModel,
    embedding,
    rope_tables,
)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg, qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, *, kv: KVCacheLike | None, layer: int,
                slots: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), positions, rope, kv, layer, slots)
        return h + self.mlp(self.mlp_norm(h))


class LlamaStage(StageModel):
    def __init__(self, cfg: ModelConfig, stage: StageSpec) -> None:
        super().__init__(cfg, stage)
        if stage.is_first:
            self.embed = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): LlamaBlock(cfg) for i in self.layer_ids})
        if stage.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
            self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def materialize(self, device: torch.device) -> None:
        self._cos, self._sin = rope_tables(self.config, self.config.max_position_embeddings, device)

    def embed_input(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def layer_extras(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        assert self._cos is not None and self._sin is not None, "materialize() not called"
        return {"rope": (self._cos[positions].to(dtype), self._sin[positions].to(dtype))}

    def final(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))
