"""The executor: runs one engine step on the model (prefills + a batched decode) -> logits.

The engine talks to the model only through the Executor protocol; ``ModelRunner`` is the whole
model in this process with the KV cache of its layers.
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
    prefill_starts: list[int] = field(default_factory=list)  # empty: every prefill starts at 0

    def groups(self) -> list[tuple[list[list[int]], list[list[int]], list[int]]]:
        """The forward calls of a step: the decode batch (if any), then one per prefill chunk.
        Each is (token ids [B][T], positions [B][T], slots [B])."""
        calls = []
        if self.decode_tokens:
            calls.append(([[t] for t in self.decode_tokens], [[p] for p in self.decode_positions],
                          list(self.decode_slots)))
        starts = self.prefill_starts or [0] * len(self.prefill_tokens)
        for tokens, slot, start in zip(self.prefill_tokens, self.prefill_slots, starts, strict=True):
            calls.append(([tokens], [list(range(start, start + len(tokens)))], [slot]))
        return calls


class Executor(Protocol):
    """Runs a step; returns float logits [decodes + prefills, vocab] for each row's last token."""

    def execute(self, step: StepInput) -> torch.Tensor: ...


class ModelRunner:
    """A whole model (a single stage holding every layer) plus its KV cache."""

    def __init__(self, model: StageModel, num_slots: int, max_model_len: int) -> None:
        if not (model.stage.is_first and model.stage.is_last):
            raise ValueError("ModelRunner needs a whole model (first and last stage)")
        self.model = model
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.kv = KVCache.for_stage(model.config, model.stage, num_slots, max_model_len, first.dtype, self.device)

    def execute(self, step: StepInput) -> torch.Tensor:
        outputs = []
        for tokens, positions, slots in step.groups():
            outputs.append(self.model(torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device),
                                      torch.tensor(slots, device=self.device), self.kv))
        return torch.cat(outputs).float()
