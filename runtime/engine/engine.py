"""LLMEngine: thread-safe front of the engine loop (submit -> stream of deltas).

Used by a vLLM worker's first requests (hydraserve.runtime.serving.first_token: vLLM's serving
layer over this engine) and ``hydraserve generate``. Callers submit from any thread; one
background thread runs steps, each step = schedule (scheduler.py) -> execute (the executor,
runner.py) -> update (sample, detokenize, stop checks, deltas to streams). The engine knows
nothing about where the model came from: it is built from an executor, a tokenizer and a few
sizes (factory.py loads them).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable

from hydraserve.errors import EngineError, HydraError, TemporaryError
from hydraserve.runtime.engine.request import Request, RequestStream
from hydraserve.runtime.engine.runner import Executor, StepInput
from hydraserve.runtime.engine.sampling import make_generator, sample
from hydraserve.runtime.engine.scheduler import Scheduler, SchedulerOutput
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.engine.validate import validate_request
from hydraserve.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, executor: Executor, tokenizer: Tokenizer, *, model_name: str, max_model_len: int,
                 vocab_size: int, max_num_seqs: int = 8, max_prefill_tokens: int = 2048) -> None:
        self.executor = executor
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self._scheduler = Scheduler(max_num_seqs, max_prefill_tokens)
        self._cond = threading.Condition()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.aborted_at_shutdown = 0

    # ---- caller side (any thread) ----

    def submit(self, prompt_token_ids: list[int], params: SamplingParams,
               request_id: str | None = None, on_put: Callable[[], None] | None = None) -> RequestStream:
        """Queue a request; raises InvalidRequestError / ContextLengthError before queueing.
        ``on_put`` is called from the engine's thread after each delta (an event loop's wake-up)."""
        validate_request(prompt_token_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
        request_id = request_id or f"req-{uuid.uuid4().hex[:16]}"
        prompt = list(prompt_token_ids)
        stream = RequestStream(request_id, prompt, on_cancel=self._wake, on_put=on_put)
        eos = params.stop_token_ids if params.stop_token_ids is not None else \
            frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids
        request = Request(
            request_id=request_id, prompt_token_ids=prompt, params=params, stream=stream,
            generator=make_generator(params.seed), detokenizer=self.tokenizer.detokenizer(prompt),
            eos_token_ids=eos,
        )
        with self._cond:
            if not self._accepting:
                raise TemporaryError("engine is shutting down", retry_after_s=1.0)
            self._scheduler.add(request)
            self._cond.notify_all()
        return stream

    def num_active(self) -> int:
        """Requests queued or generating."""
        with self._cond:
            return self._scheduler.num_active()

    def start(self) -> LLMEngine:
        """Start the background loop thread (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with ``drain`` let queued ones finish (up to ``timeout``
        seconds), then abort whatever is left (counted in ``aborted_at_shutdown``) and stop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            self._cond.notify_all()
            if drain and self._thread is not None:
                while self._scheduler.has_work():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self._cond.wait(remaining)
            leftover = self._scheduler.drain_all()
            for request in leftover:
                request.abort()
            self.aborted_at_shutdown += len(leftover)
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- loop thread ----

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._scheduler.has_work():
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug outside the model call: fail everyone, keep serving
                log.exception("engine loop step failed")
                with self._cond:
                    for request in self._scheduler.drain_all():
                        request.finish_reason = "abort"
                        request.stream.fail(EngineError(f"engine step failed: {exc}"))
                    self._cond.notify_all()

    def step(self) -> bool:
        """One engine step; False if there was nothing to do. Called by the loop (or tests)."""
        with self._cond:
            out = self._scheduler.schedule()
            for request in out.aborted:
                request.abort()
        if not out.rows:
            return bool(out.aborted)
        rows = out.rows
        sampled = [i for i, (_, samples) in enumerate(rows) if samples]
        try:
            logits = self.executor.execute(self._step_input(out))
            tokens = sample(logits[sampled], [rows[i][0].params for i in sampled],
                            [rows[i][0].generator for i in sampled])
        except Exception as exc:  # a model failure must not hang callers
            log.exception("engine step failed")
            self._fail(out, exc)
            return True
        with self._cond:
            for request in out.decode:
                request.num_computed += 1
            for chunk in out.prefill:
                chunk.request.num_computed += chunk.length
            for i, token in zip(sampled, tokens, strict=True):
                request = rows[i][0]
                if request.finished:
                    continue
                request.append_token(token)  # submit() checked prompt + max_tokens fits
                if request.finished:
                    self._scheduler.finish(request)
            self.steps += 1
            self._cond.notify_all()
        return True

    @staticmethod
    def _step_input(out: SchedulerOutput) -> StepInput:
        step = StepInput()
        for request in out.decode:
            assert request.slot is not None
            step.decode_tokens.append(request.last_token)
            step.decode_positions.append(request.num_computed)
            step.decode_slots.append(request.slot)
        for chunk in out.prefill:
            assert chunk.request.slot is not None
            step.prefill_tokens.append(chunk.request.prompt_token_ids[chunk.start:chunk.start + chunk.length])
            step.prefill_slots.append(chunk.request.slot)
            step.prefill_starts.append(chunk.start)
        return step

    def _fail(self, out: SchedulerOutput, exc: Exception) -> None:
        error = exc if isinstance(exc, HydraError) and exc.retryable else EngineError(f"generation failed: {exc}")
        with self._cond:
            for request, _ in out.rows:
                self._scheduler.finish(request)
                request.finish_reason = "abort"
                request.stream.fail(error)
            self._cond.notify_all()
