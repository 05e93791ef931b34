"""The engine's public surface as the servers use it: sampling params, streams, deltas.

The OpenAI / CloudEvents server and the worker only import this module and the engine class;
the scheduler, KV cache and model code stay behind it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (OpenAI names). temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says (benchmarks)
    # The tokens that end the request, when the caller decides them (vLLM's EOS and stop_token_ids,
    # hydraserve.runtime.serving.first_token); None: the tokenizer's EOS ids unless ignore_eos.
    stop_token_ids: frozenset[int] | None = None


@dataclass
class TokenDelta:
    """What one request gained since the previous delta."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None


class GenerationStream(Protocol):
    """Deltas of one request, blocking until each is available; ends after a finish_reason."""

    request_id: str
    prompt_token_ids: list[int]

    def __iter__(self) -> Iterator[TokenDelta]: ...

    def cancel(self) -> None:
        """Stop generating (client went away); the stream then ends with finish_reason 'abort'."""
        ...
