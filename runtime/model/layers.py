"""Building blocks shared by the Llama-family and OPT networks: norms, RoPE, attention, the base
stage module and the KV-cache interface the attention writes through.

Used only by llama.py and opt.py. The KV cache itself lives in the engine
(hydraserve.runtime.engine.kv_cache); this module declares the one method it needs from it.
Numerics follow transformers (RMSNorm in float32, RoPE tables in float32 cast to the compute
dtype) so greedy outputs match on the same weights.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from hydraserve.contracts.stage import StageSpec
from hydraserve.runtime.model.config import ModelConfig


class KVCacheLike(Protocol):
    """Per-layer key/value storage indexed by (slot, position)."""

    def update(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, T, Hkv, D] at (slots[b], positions[b, t]) of local layer ``layer``;
        return keys and values [B, Hkv, L, D] of positions 0..L-1, L >= max(positions) + 1."""
        ...


def embedding(num: int, dim: int) -> nn.Embedding:
    """An nn.Embedding without its random init: on the meta device that init imports
    torch._dynamo (about 1 s of start-up); the weights are always loaded anyway."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with linear or Llama-3 scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, max_positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_positions, head_dim] in float32 (rotate-half layout)."""
    inv_freq = rope_inv_freq(cfg).to(device)
    freqs = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, D] already in x's dtype."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head attention with GQA, optional RoPE and an optional KV cache."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.q_size, bias=qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, cfg.kv_size, bias=qkv_bias)
        self.wo = nn.Linear(cfg.q_size, cfg.hidden_size, bias=o_bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv: KVCacheLike | None, layer: int, slots: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.num_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
            mask = positions[:, None, :] <= positions[:, :, None]  # causal by position
        else:
            assert slots is not None, "a KV cache needs slot ids"
            keys, values = kv.update(layer, slots, positions, k, v)
            mask = torch.arange(keys.shape[2], device=x.device)[None, None, :] <= positions[:, :, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask[:, None],
            enable_gqa=self.num_kv_heads != self.num_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class StageModel(nn.Module):
    """Decoder layers [stage.layer_start, stage.layer_end) plus embeddings (first stage) and final
    norm + LM head (last stage). Subclasses define ``embed_input``, ``final`` and ``head``.

    ``forward(x, positions, slots=None, kv=None, all_logits=False)``: x is token ids [B, T]
    (first stage) or hidden states [B, T, H] (others); returns hidden states [B, T, H] (non-last
    stage) or logits (last stage): [B, V] for each row's last token, [B, T, V] with all_logits.
    """

    layers: nn.ModuleDict

    def __init__(self, cfg: ModelConfig, stage: StageSpec) -> None:
        super().__init__()
        self.config, self.stage = cfg, stage

    @property
    def layer_ids(self) -> range:
        return range(self.stage.layer_start, self.stage.layer_end)

    def materialize(self, device: torch.device) -> None:
        """Create the non-checkpoint buffers (RoPE tables) once the weights are real."""

    def embed_input(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def layer_extras(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        """Per-forward inputs every layer shares (RoPE cos/sin for the positions)."""
        return {}

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None = None,
                kv: KVCacheLike | None = None, all_logits: bool = False) -> torch.Tensor:
        h = self.embed_input(x, positions) if self.stage.is_first else x
        extras = self.layer_extras(positions, h.dtype)
        for local, block in enumerate(self.layers.values()):
            h = block(h, positions, kv=kv, layer=local, slots=slots, **extras)
        if not self.stage.is_last:
            return h
        if not all_logits:
            h = h[:, -1:]
        logits = self.final(h)
        return logits if all_logits else logits[:, 0]
