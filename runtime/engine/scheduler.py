"""Continuous-batching scheduler: which requests run in the next engine step.

Called by LLMEngine under its lock. Requests wait in FIFO order until a KV slot is free; each
step decodes every running request and admits waiting ones for prefill while slots and the
prefill token budget last (at least one, so a long prompt cannot starve). Finished and
cancelled requests leave between steps and give their slot back (lowest slot first, so the
batch tends to occupy contiguous slots and the KV cache can hand out views).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from hydraserve.runtime.engine.request import Request


@dataclass
class SchedulerOutput:
    decode: list[Request] = field(default_factory=list)
    prefill: list[Request] = field(default_factory=list)
    aborted: list[Request] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill or self.aborted)

    @property
    def scheduled(self) -> list[Request]:
        """Requests that get one new token this step, in logits-row order."""
        return self.decode + self.prefill


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
        out = SchedulerOutput()
        for request in [r for r in self.running if r.stream.cancelled.is_set()]:
            self.finish(request)
            out.aborted.append(request)
        for request in [r for r in self.waiting if r.stream.cancelled.is_set()]:
            self.waiting.remove(request)
            out.aborted.append(request)
        out.decode = list(self.running)
        budget = self.max_prefill_tokens
        while self.waiting and self._free_slots:
            request = self.waiting[0]
            if out.prefill and len(request.prompt_token_ids) > budget:
                break
            self.waiting.popleft()
            request.slot = heapq.heappop(self._free_slots)
            budget -= len(request.prompt_token_ids)
            self.running.append(request)
            out.prefill.append(request)
        return out

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
