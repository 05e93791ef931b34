"""Continuous-batching scheduler: which requests run in the next engine step.

Called by LLMEngine under its lock. Requests wait in FIFO order until a KV slot is free. Each
step decodes every running request whose prompt is in the cache, and spends a prefill token
budget on prompts: first continuing the chunked prefills already running, then admitting
waiting requests while slots last. A prompt longer than the budget is prefilled in chunks over
several steps, so one long prompt never stalls the others' decoding for long. Finished and
cancelled requests leave between steps and give their slot back (lowest slot first, so the
batch tends to occupy contiguous slots and the KV cache can hand out views). A request in a
step still in flight (a pipeline group runs several micro-batches at once) is left out of the
next: its next token depends on that step's result.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from hydraserve.runtime.engine.request import Request


@dataclass
class PrefillChunk:
    """Prompt tokens [start, start + length) of one request, computed this step."""

    request: Request
    start: int
    length: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.length >= len(self.request.prompt_token_ids)


@dataclass
class SchedulerOutput:
    decode: list[Request] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    aborted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill or self.aborted)

    @property
    def rows(self) -> list[tuple[Request, bool]]:
        """(request, samples a token) per logits row: decodes, then prefill chunks; a chunk
        samples only when it completes its prompt."""
        return [(r, True) for r in self.decode] + [(c.request, c.completes_prompt) for c in self.prefill]


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int = 2048) -> None:
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._free_slots = list(range(num_slots))
        self.max_prefill_tokens = max_prefill_tokens

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_active(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> SchedulerOutput:
        """The next step: every running request's next decode, then prefill chunks (running
        requests' first, then new ones while slots are free) within the token budget."""
        out = SchedulerOutput()
        for request in [r for r in self.running if r.stream.cancelled.is_set()]:
            self.finish(request)
            out.aborted.append(request)
        for request in [r for r in self.waiting if r.stream.cancelled.is_set()]:
            self.waiting.remove(request)
            out.aborted.append(request)
        out.decode = [r for r in self.running if r.prefill_done]
        budget = self.max_prefill_tokens
        for request in self.running:
            if not request.prefill_done and budget > 0:
                budget -= self._chunk(out, request, budget)
        while self.waiting and self._free_slots and budget > 0:
            request = self.waiting.popleft()
            request.slot = heapq.heappop(self._free_slots)
            self.running.append(request)
            budget -= self._chunk(out, request, budget)
        return out

    @staticmethod
    def _chunk(out: SchedulerOutput, request: Request, budget: int) -> int:
        length = min(len(request.prompt_token_ids) - request.num_computed, budget)
        out.prefill.append(PrefillChunk(request, request.num_computed, length))
        return length

    def finish(self, request: Request) -> None:
        """Take a request out of the running set and free its slot."""
        if request in self.running:
            self.running.remove(request)
        if request.slot is not None:
            heapq.heappush(self._free_slots, request.slot)
            request.slot = None

    def drain_all(self) -> list[Request]:
        """Remove every request (engine shutdown without drain)."""
        requests = list(self.running) + list(self.waiting)
        for request in list(self.running):
            self.finish(request)
        self.waiting.clear()
        return requests
