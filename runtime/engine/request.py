"""One request's state inside the engine, and the stream its caller reads deltas from.

Created by LLMEngine.submit; mutated only by the engine loop thread (``append_token``,
``finish``); read by the caller through ``RequestStream`` (a thread-safe queue of TokenDelta).
Turning tokens into text lives here: incremental detokenization, stop strings (trimmed from
the text, with the tail held back while it could still become a stop string), max_tokens, EOS.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from hydraserve.runtime.engine.types import FinishReason, SamplingParams, TokenDelta
from hydraserve.runtime.tokenizer import IncrementalDetokenizer


@dataclass
class GenerationResult:
    """Everything a finished request produced."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None


class RequestStream:
    """GenerationStream implementation: iterate to get deltas; the last has a finish_reason."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], on_cancel: Callable[[], None],
                 on_put: Callable[[], None] | None = None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self._queue: queue.Queue[TokenDelta | BaseException] = queue.Queue()
        self._on_cancel = on_cancel
        self._on_put = on_put  # told (from the engine's thread) after each delta or failure
        self._done = False
        self.cancelled = threading.Event()

    def put(self, delta: TokenDelta) -> None:
        self._queue.put(delta)
        if self._on_put is not None:
            self._on_put()

    def fail(self, error: BaseException) -> None:
        self._queue.put(error)
        if self._on_put is not None:
            self._on_put()

    def __iter__(self) -> Iterator[TokenDelta]:
        while not self._done:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._done = True
                raise item
            if item.finish_reason is not None:
                self._done = True
            yield item

    def poll(self) -> TokenDelta | None:
        """The next delta if one is waiting, else None (never blocks)."""
        if self._done:
            return None
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel()

    def collect(self) -> GenerationResult:
        """Block until the request finishes; all its tokens and text."""
        token_ids: list[int] = []
        parts: list[str] = []
        reason: FinishReason | None = None
        for delta in self:
            token_ids += delta.token_ids
            parts.append(delta.text)
            reason = delta.finish_reason or reason
        return GenerationResult(self.request_id, self.prompt_token_ids, token_ids, "".join(parts), reason)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    output_token_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    finish_reason: FinishReason | None = None
    text: str = ""
    _sent_chars: int = 0
    _sent_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefill_done(self) -> bool:
        return self.num_computed >= len(self.prompt_token_ids)

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append_token(self, token_id: int) -> None:
        """Record a sampled token: detokenize, check EOS / stop strings / max_tokens, emit a delta."""
        self.output_token_ids.append(token_id)
        if token_id in self.eos_token_ids:
            self.text += self.detokenizer.flush()
            self._finish("stop")
            return
        before = len(self.text)
        self.text += self.detokenizer.step(token_id)
        if self.params.stop and self._trim_stop(before):
            self._finish("stop")
            return
        if len(self.output_token_ids) >= self.params.max_tokens:
            self.text += self.detokenizer.flush()
            if self.params.stop and self._trim_stop(before):
                self._finish("stop")
                return
            self._finish("length")
            return
        self._emit(None)

    def abort(self) -> None:
        if not self.finished:
            self._finish("abort")

    def _trim_stop(self, before: int) -> bool:
        """Cut the text at the earliest stop string that appeared in the new text."""
        longest = max(len(s) for s in self.params.stop)
        start = max(0, before - longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        return True

    def _finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        self._emit(reason)

    def _emit(self, reason: FinishReason | None) -> None:
        end = len(self.text)
        if reason is None and self.params.stop:  # hold back a tail that may start a stop string
            end = max(self._sent_chars, end - (max(len(s) for s in self.params.stop) - 1))
        delta = TokenDelta(self.output_token_ids[self._sent_tokens:], self.text[self._sent_chars:end], reason)
        self._sent_chars, self._sent_tokens = end, len(self.output_token_ids)
        self.stream.put(delta)
