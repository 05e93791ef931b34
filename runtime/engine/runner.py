"""Executors: run one engine step on the model (prefills + a batched decode) -> logits.

The engine talks to the model only through the Executor protocol, so where the layers live is
not its concern. ``StageRunner`` runs one pipeline stage's share of a step on the activations
it is given and owns the KV cache of that stage's layers; ``ModelRunner`` is the whole model
in-process; ``PipelineExecutor`` chains stages in one process (tests, consolidation). A group
whose stages are other processes is driven from its head by
hydraserve.runtime.transport.group.GroupExecutor, which also keeps several steps in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
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


class StageExecutor(Protocol):
    """One stage's share of a step: activations of each forward call in, activations out
    (hidden states [B, T, H] for inner stages, last-token logits [B, V] from the last)."""

    def run(self, step: StepInput, inputs: Sequence[torch.Tensor] | None) -> list[torch.Tensor]: ...


class StageRunner:
    """A stage model plus the KV cache of its layers."""

    def __init__(self, model: StageModel, num_slots: int, max_model_len: int) -> None:
        self.model = model
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.kv = KVCache.for_stage(model.config, model.stage, num_slots, max_model_len, first.dtype, self.device)

    def run(self, step: StepInput, inputs: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        calls = step.groups()
        if inputs is None:
            if not self.model.stage.is_first:
                raise ValueError("a non-first stage needs the previous stage's hidden states")
            inputs = [torch.tensor(tokens, device=self.device) for tokens, _, _ in calls]
        outputs = []
        for x, (_, positions, slots) in zip(inputs, calls, strict=True):
            outputs.append(self.model(x, torch.tensor(positions, device=self.device),
                                      torch.tensor(slots, device=self.device), self.kv))
        return outputs


class ModelRunner(StageRunner):
    """In-process executor over a whole model (a single stage holding every layer)."""

    def __init__(self, model: StageModel, num_slots: int, max_model_len: int) -> None:
        if not (model.stage.is_first and model.stage.is_last):
            raise ValueError("ModelRunner needs a whole model (first and last stage)")
        super().__init__(model, num_slots, max_model_len)

    def execute(self, step: StepInput) -> torch.Tensor:
        return torch.cat(self.run(step, None)).float()


class PipelineExecutor:
    """Runs stages one after another for each step (stage i's outputs are stage i+1's inputs)."""

    def __init__(self, stages: Sequence[StageExecutor]) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = list(stages)

    def execute(self, step: StepInput) -> torch.Tensor:
        activations: list[torch.Tensor] | None = None
        for stage in self.stages:
            activations = stage.run(step, activations)
        assert activations is not None
        return torch.cat(activations).float()
