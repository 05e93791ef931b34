"""The handover engine (runtime/serving/handover.py) between two engines that play vLLM's AsyncLLM:
``generate`` yields RequestOutputs (vLLM's own classes) one token per step, closing the stream
aborts the request, and the next token is a function of every token before it (so a request
re-prefilled elsewhere with its prompt plus what it produced must continue exactly as greedy
decoding would). vLLM's real engines under the same handover: tests/runtime/test_vllm_group.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from vllm import SamplingParams
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind

from hydraserve.runtime.serving.handover import HandoverEngine


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) * 31 + 7) % 997


def greedy(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


async def until(check: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Return once ``check()`` is truthy (the loop runs meanwhile); fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "the condition never came"
        await asyncio.sleep(0.002)


class Engine:
    """One token every ``step_s``; records what it was asked and what was aborted."""

    def __init__(self, name: str, step_s: float = 0.01) -> None:
        self.name = name
        self.step_s = step_s
        self.started: list[tuple[str, list[int], int | None]] = []
        self.aborted: list[str] = []
        self.made = 0  # tokens made, over every request

    async def generate(self, prompt: Any, params: Any, request_id: str, **_: Any) -> AsyncIterator[RequestOutput]:
        ids = list(prompt["prompt_token_ids"])
        self.started.append((request_id, ids, params.max_tokens))
        made: list[int] = []
        last = False
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.step_s)
                token = next_token(ids + made)
                made.append(token)
                self.made += 1
                last = i == params.max_tokens - 1
                if params.output_kind == RequestOutputKind.FINAL_ONLY and not last:
                    continue
                shown = [token] if params.output_kind == RequestOutputKind.DELTA else list(made)
                yield RequestOutput(request_id, None, ids, None, [CompletionOutput(
                    0, "".join(f"<{t}>" for t in shown), shown, None, None,
                    finish_reason="length" if last else None)], finished=last)
        except (GeneratorExit, asyncio.CancelledError):
            if not last:  # closed after its final output is no abort (as in vLLM)
                self.aborted.append(request_id)
            raise

    async def abort(self, request_id: str, internal: bool = False) -> None:
        self.aborted.append(request_id)


def params(kind: RequestOutputKind, max_tokens: int = 40, **kw: Any) -> SamplingParams:
    p = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **kw})
    p.output_kind = kind
    return p


async def collect(handover: HandoverEngine, prompt: list[int], sp: SamplingParams, rid: str) -> list[RequestOutput]:
    return [out async for out in handover.generate({"prompt_token_ids": prompt}, sp, rid)]


def test_a_stream_in_flight_moves_after_the_bound_and_continues_token_for_token() -> None:
    async def scenario() -> None:
        old, new = Engine("old"), Engine("new")
        handover = HandoverEngine(old)
        streaming = asyncio.create_task(collect(handover, [5, 6, 7], params(RequestOutputKind.DELTA), "r1"))
        await until(lambda: old.made >= 5)  # some tokens came from the old engine
        moved = await handover.switch(new, bound_s=0.05)
        outputs = await streaming
        assert moved == 1 and handover.moved == 1
        tokens = [t for out in outputs for t in out.outputs[0].token_ids]
        assert tokens == greedy([5, 6, 7], 40)  # no token lost, repeated or changed
        assert all(out.prompt_token_ids == [5, 6, 7] for out in outputs)  # the client's own prompt
        assert outputs[-1].finished and old.aborted == ["r1"]
        (rid, resent, budget), = new.started
        assert rid == "r1" and resent == [5, 6, 7, *tokens[:len(resent) - 3]] and budget == 40 - (len(resent) - 3)
        assert 0 < len(resent) - 3 < 40
        late = await collect(handover, [1], params(RequestOutputKind.DELTA, 3), "r2")  # new ones: the new engine
        assert [s[0] for s in new.started] == ["r1", "r2"] and len(late) == 3
    asyncio.run(scenario())


def test_a_non_streamed_request_starts_over_and_a_cumulative_one_keeps_its_prefix() -> None:
    async def scenario() -> None:
        old, new = Engine("old"), Engine("new")
        handover = HandoverEngine(old)
        final = asyncio.create_task(collect(handover, [9], params(RequestOutputKind.FINAL_ONLY), "f"))
        cumulative = asyncio.create_task(collect(handover, [3, 4], params(RequestOutputKind.CUMULATIVE), "c"))
        await until(lambda: len(old.started) == 2 and old.made >= 4)  # both are under way
        assert await handover.switch(new, bound_s=0.0) == 2
        (only,) = await final
        assert list(only.outputs[0].token_ids) == greedy([9], 40)
        assert [s[1] for s in new.started if s[0] == "f"] == [[9]]  # nothing was shown: it simply starts over
        outs = await cumulative
        assert list(outs[-1].outputs[0].token_ids) == greedy([3, 4], 40)
        assert outs[-1].outputs[0].text == "".join(f"<{t}>" for t in greedy([3, 4], 40))
        lengths = [len(out.outputs[0].token_ids) for out in outs]
        assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)  # grows, never restarts
    asyncio.run(scenario())


def test_requests_with_several_completions_finish_where_they_are() -> None:
    async def scenario() -> None:
        old, new = Engine("old"), Engine("new")
        handover = HandoverEngine(old)
        several = asyncio.create_task(collect(handover, [2], params(RequestOutputKind.DELTA, 20, n=2, temperature=0.8), "n2"))
        await until(lambda: old.made >= 2)
        assert await handover.switch(new, bound_s=0.0) == 0
        assert len(await several) == 20 and not new.started and not old.aborted
    asyncio.run(scenario())


@pytest.mark.parametrize("moving", [False, True])
def test_a_consumer_that_leaves_aborts_the_request_where_it_runs(moving: bool) -> None:
    async def scenario() -> None:
        old, new = Engine("old", step_s=0.05), Engine("new")
        handover = HandoverEngine(old)
        stream = handover.generate({"prompt_token_ids": [1, 2]}, params(RequestOutputKind.DELTA), "gone")
        await stream.__anext__()
        if moving:  # the move is armed but the consumer leaves first: the stream was waiting on a step
            handover._move.setdefault(id(old), asyncio.Event())  # as switch() makes it, not yet set
        pending = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0.01)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await stream.aclose()
        assert old.aborted == ["gone"] and not new.started
        await handover.abort("someone")  # nothing runs: the current engine is asked
        assert old.aborted == ["gone", "someone"]
    asyncio.run(scenario())


class Choosy(Engine):
    """An engine that takes only greedy requests (as the compact engine answering first requests)."""

    def takes(self, prompt: Any, params: Any) -> bool:
        return bool(params.temperature == 0.0)


def test_a_request_the_first_engine_does_not_take_waits_for_the_next_one() -> None:
    async def scenario() -> None:
        first, vllm = Choosy("first"), Engine("vllm")
        handover = HandoverEngine(first)
        taken = await collect(handover, [4], params(RequestOutputKind.DELTA, 3), "greedy")
        waiting = asyncio.create_task(collect(handover, [4], params(RequestOutputKind.DELTA, 3, temperature=0.7), "hot"))
        await until(lambda: handover.deferred == 1)
        assert not waiting.done() and handover.deferred == 1 and [s[0] for s in first.started] == ["greedy"]
        await handover.switch(vllm, bound_s=0.0)
        assert len(await waiting) == 3 and [s[0] for s in vllm.started] == ["hot"] and len(taken) == 3
    asyncio.run(scenario())


def test_requests_waiting_for_an_engine_that_never_comes_get_its_error() -> None:
    async def scenario() -> None:
        handover = HandoverEngine(Choosy("first"))
        waiting = asyncio.create_task(collect(handover, [4], params(RequestOutputKind.DELTA, 3, temperature=0.7), "hot"))
        await until(lambda: handover.deferred == 1)
        handover.no_successor(RuntimeError("vLLM failed to start"))
        with pytest.raises(RuntimeError, match="failed to start"):
            await waiting
    asyncio.run(scenario())
