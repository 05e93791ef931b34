"""ModelRunner: executes one engine step on a model (prefills + a batched decode) -> logits.

The engine talks to the model only through the Executor protocol below, so a pipelined
executor (stages on other workers, hidden states over TCP) can stand in for this in-process
one. The runner owns the KV cache of the layers it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from hydraserve.runtime.engine.kv_cache import KVCache
from hydraserve.runtime.model.layers import StageModel


@dataclass
class StepInput:
    """What to compute in one step. Logits rows: decodes in order, then prefills in order."""

    decode_tokens: list[int] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    decode_slots: list[int] = field(default_factory=list)
    prefill_tokens: list[list[int]] = field(default_factory=list)
    prefill_slots: list[int] = field(default_factory=list)


class Executor(Protocol):
    """Runs a step; returns float logits [decodes + prefills, vocab] for each row's last token."""

    def execute(self, step: StepInput) -> torch.Tensor: ...


class ModelRunner:
    """In-process executor over a whole model (a single stage holding every layer)."""

    def __init__(self, model: StageModel, num_slots: int, max_model_len: int) -> None:
        if not (model.stage.is_first and model.stage.is_last):
            raise ValueError("ModelRunner needs a whole model (first and last stage)")
        self.model = model
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        self.device = device
        self.kv = KVCache.for_stage(model.config, model.stage, num_slots, max_model_len, dtype, device)

    def execute(self, step: StepInput) -> torch.Tensor:
        rows: list[torch.Tensor] = []
        if step.decode_tokens:
            ids = torch.tensor(step.decode_tokens, device=self.device)[:, None]
            positions = torch.tensor(step.decode_positions, device=self.device)[:, None]
            slots = torch.tensor(step.decode_slots, device=self.device)
            rows.append(self.model(ids, positions, slots, self.kv))
        for tokens, slot in zip(step.prefill_tokens, step.prefill_slots, strict=True):
            ids = torch.tensor(tokens, device=self.device)[None]
            positions = torch.arange(len(tokens), device=self.device)[None]
            slots = torch.tensor([slot], device=self.device)
            rows.append(self.model(ids, positions, slots, self.kv))
        return torch.cat(rows).float()
