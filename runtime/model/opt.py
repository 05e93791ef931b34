"""The OPT decoder as a stage (facebook/opt-125m ... 66b, including OPT-350m's post-LN layout).

Built by loader.py. Learned positions with offset 2, LayerNorm, ReLU MLP, pre-LN
(do_layer_norm_before=True) or post-LN, project_in/project_out when word_embed_proj_dim differs
from hidden_size, LM head tied to the token embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hydraserve.contracts.stage import StageSpec
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.model.layers import Attention, KVCacheLike, StageModel, embedding

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (fairseq padding legacy)


class OPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pre_ln = cfg.do_layer_norm_before
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = Attention(cfg, qkv_bias=cfg.enable_bias, o_bias=cfg.enable_bias)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.enable_bias)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, *, kv: KVCacheLike | None, layer: int,
                slots: torch.Tensor | None) -> torch.Tensor:
        if self.pre_ln:
            h = h + self.attn(self.attn_norm(h), positions, None, kv, layer, slots)
            return h + self.fc2(F.relu(self.fc1(self.mlp_norm(h))))
        h = self.attn_norm(h + self.attn(h, positions, None, kv, layer, slots))
        return self.mlp_norm(h + self.fc2(F.relu(self.fc1(h))))


class OPTStage(StageModel):
    def __init__(self, cfg: ModelConfig, stage: StageSpec) -> None:
        super().__init__(cfg, stage)
        projected = cfg.word_embed_proj_dim != cfg.hidden_size
        if stage.is_first:
            self.embed = embedding(cfg.vocab_size, cfg.word_embed_proj_dim)
            self.pos_embed = embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
            self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False) if projected else None
        self.layers = nn.ModuleDict({str(i): OPTBlock(cfg) for i in self.layer_ids})
        if stage.is_last:
            self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps) if cfg.final_layer_norm else None
            self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False) if projected else None
            self.head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)

    def embed_input(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.project_in is not None:
            h = self.project_in(h)
        return h + self.pos_embed(positions + POSITION_OFFSET)

    def final(self, h: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            h = self.final_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.head(h)
