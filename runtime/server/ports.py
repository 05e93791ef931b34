"""What the server needs from the engine (the consumer owns the interface).

The engine package implements these; tests may pass any object that fits.
"""

from __future__ import annotations

from typing import Protocol

from hydraserve.runtime.engine.types import GenerationStream, SamplingParams


class PromptTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


class ServingEngine(Protocol):
    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def tokenizer(self) -> PromptTokenizer: ...

    def submit(self, prompt_token_ids: list[int], params: SamplingParams,
               request_id: str | None = None) -> GenerationStream: ...

    def num_active(self) -> int: ...

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None: ...
