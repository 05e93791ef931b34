"""The engine vLLM's OpenAI app talks to: a pipeline group's engine, then the standalone engine
that consolidation started, with no request lost or changed.

vLLM's serving layer holds one engine client for its whole life; the worker gives it a
:class:`HandoverEngine`, which forwards everything to the engine that serves now and, in
``generate``, follows what each request has produced. ``switch(new, bound_s)``: new requests go
to ``new`` at once; each request in flight on the old engine continues there for up to
``bound_s``, then is aborted there and re-prefilled on ``new`` (its prompt plus the tokens it
produced so far, with what is left of its budget), so a stream goes on from where it was and a
non-streamed request (whose output comes at its end) starts over on ``new``. ``switch`` returns
once the old engine has nothing in flight; the caller then stops it. Greedy requests continue
token for token; a sampled request continues with the new engine's randomness (a seed does not
carry over mid-sequence), and a stop string split across the move may be missed. Requests with
``n > 1`` or beam search are not moved: they finish on the old engine whatever the bound.
An engine with a ``takes(prompt, params)`` (the compact engine answering a worker's first
requests: hydraserve.runtime.serving.first_token) gets only the requests it takes; the others
wait for the engine switched to next. Called by the consolidation
(hydraserve.runtime.serving.consolidation) and the first-token hand-over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

log = logging.getLogger(__name__)


class HandoverEngine:
    """An engine client that can move to another engine under vLLM's serving layer."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._app_model_config = getattr(engine, "model_config", None)  # the one vLLM's serving layer holds
        self._owner: dict[str, Any] = {}  # request id -> the engine it runs on
        self._move: dict[int, asyncio.Event] = {}  # id(engine) -> set once its requests must move
        self.moved = 0  # requests re-prefilled on a new engine (tests and the timeline read it)
        self.deferred = 0  # requests the first engine did not take, answered by the next
        self.served = asyncio.Event()  # a request has been answered to its end
        self.answered = asyncio.Event()  # a request's first output has gone out
        self._retired: list[Any] = []  # kept: collecting one would stop the renderer still in use
        self._next: asyncio.Future[Any] | None = None  # the engine switched to next (deferred requests wait)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property
    def engine(self) -> Any:
        return self._engine

    async def abort(self, request_id: Any, internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            await self._owner.get(rid, self._engine).abort(rid, internal)

    def _successor(self) -> asyncio.Future[Any]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def no_successor(self, error: BaseException) -> None:
        """No engine will follow (it failed to start): requests waiting for one fail with ``error``."""
        successor = self._successor()
        if not successor.done():
            successor.set_exception(error)
            successor.exception()  # retrieved: no "never retrieved" warning when nobody waited

    async def switch(self, new: Any, bound_s: float) -> int:
        """Serve from ``new``; move the old engine's stragglers after ``bound_s``; return once the
        old engine holds no request (the number moved)."""
        old, self._engine = self._engine, new
        # vLLM's serving layer checks lengths against the first engine's model config: the new
        # engine's context (its KV cache's auto-fit) is the one that holds from now on
        if self._app_model_config is not None:
            self._app_model_config.max_model_len = new.model_config.max_model_len
        successor = self._successor()
        if not successor.done():
            successor.set_result(new)
        self._next = None
        move = self._move.setdefault(id(old), asyncio.Event())
        deadline = time.monotonic() + bound_s
        moved_before = self.moved
        while any(owner is old for owner in self._owner.values()):
            if not move.is_set() and time.monotonic() >= deadline:
                log.info("moving %d request(s) still on the old engine", sum(o is old for o in self._owner.values()))
                move.set()
            await asyncio.sleep(0.01)
        self._move.pop(id(old), None)
        return self.moved - moved_before

    def retire(self, old: Any) -> None:
        """Stop an engine switched away from, all but its renderer (tokenizer, chat templates):
        vLLM's serving layer took the first engine's renderer when the app was built and keeps
        using it (``AsyncLLM.shutdown``, also run when the object is collected, would stop its
        thread pool under every later request). The object is kept for that reason."""
        from vllm.utils.async_utils import cancel_task_threadsafe

        self._retired.append(old)
        old.engine_core.shutdown()
        if old.output_handler is not None:
            cancel_task_threadsafe(old.output_handler)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                       **kwargs: Any) -> AsyncGenerator[Any, None]:
        from vllm.sampling_params import RequestOutputKind

        engine = self._engine
        takes = getattr(engine, "takes", None)  # an engine that answers only some requests (first_token)
        if takes is not None and not takes(prompt, sampling_params):
            self.deferred += 1
            engine = await asyncio.shield(self._successor())
        movable = sampling_params.n == 1 and not getattr(sampling_params, "use_beam_search", False)
        produced: list[int] = []  # tokens this request has yielded so far (n == 1)
        texts: list[str] = []
        before_move: tuple[list[int], str] = ([], "")  # what was produced when it last moved
        original_prompt = prompt
        params = sampling_params
        self._owner[request_id] = engine
        stream = engine.generate(prompt, params, request_id, **kwargs)
        ended = False
        try:
            while True:
                move = self._move.setdefault(id(engine), asyncio.Event()) if movable else None
                out = await _next_or_moved(stream, move)
                if out is _MOVED:
                    engine = self._engine
                    self._owner[request_id] = engine
                    self.moved += 1
                    prompt, params = _continued(original_prompt, sampling_params, produced)
                    before_move = (list(produced), "".join(texts))
                    stream = engine.generate(prompt, params, request_id, **kwargs)
                    continue
                if out is _ENDED:
                    ended = True
                    return
                if prompt is not original_prompt:  # re-prefilled: the client sees its own prompt
                    out = _as_continuation(out, original_prompt, sampling_params.output_kind, *before_move)
                if sampling_params.output_kind == RequestOutputKind.DELTA and out.outputs:
                    produced.extend(out.outputs[0].token_ids)
                    texts.append(out.outputs[0].text)
                elif sampling_params.output_kind == RequestOutputKind.CUMULATIVE and out.outputs:
                    produced[:] = list(out.outputs[0].token_ids)
                    texts[:] = [out.outputs[0].text]
                ended = out.finished
                self.answered.set()
                yield out
                if out.finished:
                    self.served.set()
                    return
        finally:
            self._owner.pop(request_id, None)
            if not ended:  # a client gone (or any early exit): closing the stream aborts it in vLLM
                await stream.aclose()


_MOVED = object()
_ENDED = object()


async def _next_or_moved(stream: Any, move: asyncio.Event | None) -> Any:
    """The stream's next output, _ENDED, or _MOVED (the stream was cancelled: vLLM aborts it)."""
    if move is None:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return _ENDED
    if move.is_set():
        await stream.aclose()
        return _MOVED
    step = asyncio.ensure_future(stream.__anext__())
    moving = asyncio.ensure_future(move.wait())
    try:
        await asyncio.wait({step, moving}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the caller went away: the stream is free to close after this
        await _cancelled(step)
        raise
    finally:
        moving.cancel()
    if step.done():
        try:
            return step.result()
        except StopAsyncIteration:
            return _ENDED
    await _cancelled(step)
    await stream.aclose()
    return _MOVED


async def _cancelled(step: asyncio.Future[Any]) -> None:
    step.cancel()
    try:
        await step
    except (asyncio.CancelledError, StopAsyncIteration):
        pass


def _continued(prompt: Any, params: Any, produced: list[int]) -> tuple[Any, Any]:
    """The request to send the new engine: prompt + what was produced, with the rest of its budget
    (a non-streamed request produced nothing visible: it simply starts again)."""
    if not produced:
        return prompt, params
    ids = _prompt_ids(prompt)
    rest = params.clone()
    if rest.max_tokens is not None:
        rest.max_tokens = max(1, rest.max_tokens - len(produced))
    rest.min_tokens = max(0, rest.min_tokens - len(produced))
    return {"type": "token", "prompt_token_ids": ids + produced}, rest


def _prompt_ids(prompt: Any) -> list[int]:
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else getattr(prompt, "prompt_token_ids", None)
    if ids is None:
        raise ValueError("a request without prompt token ids cannot be moved")
    return list(ids)


def _as_continuation(out: Any, prompt: Any, kind: Any, ids_before: list[int], text_before: str) -> Any:
    """A new engine's output shown as the original request's: its prompt, and (cumulative
    outputs) what was produced before the move in front."""
    from vllm.sampling_params import RequestOutputKind

    out.prompt_token_ids = _prompt_ids(prompt)
    out.prompt = prompt.get("prompt") if isinstance(prompt, dict) else None
    if kind == RequestOutputKind.CUMULATIVE and out.outputs:
        first = out.outputs[0]
        first.token_ids = [*ids_before, *first.token_ids]
        first.text = text_before + first.text
    return out
