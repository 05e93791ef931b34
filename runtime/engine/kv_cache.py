"""Preallocated KV cache: fixed-shape key/value buffers [layers, slots, kv_heads, max_len, head_dim].

Owned by the ModelRunner (one per stage: it holds only that stage's layers); written in place by
the model's attention through ``update`` (the KVCacheLike interface declared in
hydraserve.runtime.model.layers). A request owns one slot from admission to finish; the cache
never grows or reallocates, so memory is known at start-up (and can be allocated while weights
are still arriving).
"""

from __future__ import annotations

import torch

from hydraserve.contracts.stage import StageSpec
from hydraserve.runtime.model.config import ModelConfig


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu") -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots, self.max_len = num_slots, max_len

    @classmethod
    def for_stage(cls, cfg: ModelConfig, stage: StageSpec, num_slots: int, max_len: int,
                  dtype: torch.dtype, device: str | torch.device = "cpu") -> KVCache:
        return cls(stage.layer_end - stage.layer_start, num_slots, max_len, cfg.num_kv_heads,
                   cfg.head_dim, dtype, device)

    @staticmethod
    def bytes_needed(cfg: ModelConfig, num_layers: int, num_slots: int, max_len: int, dtype: torch.dtype) -> int:
        """Memory a cache of this shape takes (the placement model's KV reserve)."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * num_slots * cfg.num_kv_heads * max_len * cfg.head_dim * element

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def update(self, layer: int, slots: torch.Tensor, positions: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, T, Hkv, D] at (slot, position); return [B, Hkv, L, D] for positions < L."""
        kc, vc = self.k[layer], self.v[layer]
        index = (slots[:, None], slice(None), positions)
        kc[index] = k
        vc[index] = v
        length = int(positions.max()) + 1
        first, batch = int(slots[0]), slots.shape[0]
        if torch.equal(slots, torch.arange(first, first + batch, device=slots.device)):
            return kc[first:first + batch, :, :length], vc[first:first + batch, :, :length]  # views
        return kc[slots, :, :length], vc[slots, :, :length]

    def export_slot(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of one request's keys and values [layers, Hkv, length, D] (KV migration)."""
        return self.k[:, slot, :, :length].clone(), self.v[:, slot, :, :length].clone()

    def import_slot(self, slot: int, k: torch.Tensor, v: torch.Tensor, first_layer: int = 0) -> None:
        """Write exported keys/values into ``slot`` of local layers first_layer.. (KV migration)."""
        layers, length = k.shape[0], k.shape[2]
        self.k[first_layer:first_layer + layers, slot, :, :length] = k
        self.v[first_layer:first_layer + layers, slot, :, :length] = v
