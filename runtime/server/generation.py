"""Turn a validated OpenAI request into engine work and OpenAI-shaped results.

Shared by the OpenAI routes (JSON or SSE) and the CloudEvents handler (JSON only), so both
paths tokenize, apply the chat template, and count usage the same way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from hydraserve.errors import InvalidRequestError, NotFoundError
from hydraserve.runtime.engine.types import GenerationStream, SamplingParams
from hydraserve.runtime.server.ports import ServingEngine
from hydraserve.runtime.server.schemas import ChatCompletionRequest, CompletionRequest

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256


@dataclass
class PreparedRequest:
    """A request ready for the engine: prompt ids, sampling params and response metadata."""

    kind: Literal["completion", "chat"]
    prompt_token_ids: list[int]
    params: SamplingParams
    echo_text: str = ""
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id


def check_model(engine: ServingEngine, requested: str | None) -> None:
    """A request naming another model is a 404 (as OpenAI and vLLM answer), not silently served."""
    if requested is not None and requested != engine.model_name:
        raise NotFoundError(f"model {requested!r} not found: this function serves {engine.model_name!r}",
                            param="model", code="model_not_found")


def prepare_completion(engine: ServingEngine, req: CompletionRequest) -> PreparedRequest:
    check_model(engine, req.model)
    if isinstance(req.prompt, str):
        ids = engine.tokenizer.encode(req.prompt)
        echo = req.prompt if req.echo else ""
    else:
        ids = list(req.prompt)
        if any(not 0 <= t < engine.vocab_size for t in ids):  # before echo decodes them
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {engine.vocab_size})", param="prompt")
        echo = engine.tokenizer.decode(ids) if req.echo else ""
    return PreparedRequest("completion", ids, req.sampling_params(DEFAULT_COMPLETION_MAX_TOKENS), echo)


def prepare_chat(engine: ServingEngine, req: ChatCompletionRequest) -> PreparedRequest:
    check_model(engine, req.model)
    text = engine.tokenizer.apply_chat_template([m.model_dump() for m in req.messages])
    ids = engine.tokenizer.encode(text)
    default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, engine.max_model_len - len(ids)))
    return PreparedRequest("chat", ids, req.sampling_params(default))


def submit(engine: ServingEngine, prepared: PreparedRequest) -> GenerationStream:
    """Hand the request to the engine; raises the engine's validation errors unchanged."""
    return engine.submit(prepared.prompt_token_ids, prepared.params, request_id=prepared.request_id)


def complete(engine: ServingEngine, prepared: PreparedRequest,
             client_gone: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run to the end and build the non-streaming OpenAI response; a client that went away
    (asked after every step) cancels the request in the engine."""
    stream = submit(engine, prepared)
    texts: list[str] = []
    token_ids: list[int] = []
    finish: str | None = None
    for delta in stream:
        if client_gone():
            stream.cancel()
        texts.append(delta.text)
        token_ids.extend(delta.token_ids)
        finish = delta.finish_reason or finish
    text = prepared.echo_text + "".join(texts)
    usage = _usage(prepared, len(token_ids))
    if prepared.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    choice["token_ids"] = token_ids  # extension (as vLLM's return_token_ids): exact-match checks
    return _envelope(engine, prepared, "chat.completion" if prepared.kind == "chat" else "text_completion",
                     [choice]) | {"usage": usage}


def stream_chunks(engine: ServingEngine, prepared: PreparedRequest) -> Iterator[dict[str, Any]]:
    """OpenAI streaming chunks; closing the iterator early cancels the request in the engine."""
    stream = submit(engine, prepared)
    is_chat = prepared.kind == "chat"
    obj = "chat.completion.chunk" if is_chat else "text_completion"
    n_tokens = 0
    try:
        if is_chat:
            yield _envelope(engine, prepared, obj, [{"index": 0, "delta": {"role": "assistant"},
                                                     "finish_reason": None}])
        elif prepared.echo_text:
            yield _envelope(engine, prepared, obj, [_text_choice(prepared.echo_text, [], None)])
        for delta in stream:
            n_tokens += len(delta.token_ids)
            if is_chat:
                choice: dict[str, Any] = {"index": 0, "delta": {"content": delta.text} if delta.text else {},
                                          "token_ids": delta.token_ids, "finish_reason": delta.finish_reason}
            else:
                choice = _text_choice(delta.text, delta.token_ids, delta.finish_reason)
            chunk = _envelope(engine, prepared, obj, [choice])
            if delta.finish_reason is not None:
                chunk["usage"] = _usage(prepared, n_tokens)
            yield chunk
    finally:
        stream.cancel()  # no-op when finished; stops generation when the client left


def _text_choice(text: str, token_ids: list[int], finish: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "token_ids": token_ids, "logprobs": None, "finish_reason": finish}


def _envelope(engine: ServingEngine, prepared: PreparedRequest, obj: str,
              choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": prepared.response_id, "object": obj, "created": prepared.created,
            "model": engine.model_name, "choices": choices}


def _usage(prepared: PreparedRequest, completion_tokens: int) -> dict[str, int]:
    prompt = len(prepared.prompt_token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}
