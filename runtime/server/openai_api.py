"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (JSON or SSE), /v1/models."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request, stream_with_context

from hydraserve.errors import EngineError, HydraError
from hydraserve.http_json import read_json, validate
from hydraserve.http_server import client_gone
from hydraserve.runtime.server import generation
from hydraserve.runtime.server.metrics import RuntimeMetrics
from hydraserve.runtime.server.schemas import ChatCompletionRequest, CompletionRequest
from hydraserve.runtime.server.state import RuntimeState

log = logging.getLogger(__name__)


def create_openai_blueprint(state: RuntimeState, metrics: RuntimeMetrics,
                            ready_wait_s: float) -> Blueprint:
    bp = Blueprint("openai", __name__)

    def _run(kind: str) -> Response:
        body = read_json()
        if kind == "chat":  # validate before waiting for the engine: bad input fails fast
            chat = validate(ChatCompletionRequest, body)
            engine = state.engine(ready_wait_s)
            prepared, stream = generation.prepare_chat(engine, chat), chat.stream
        else:
            completion = validate(CompletionRequest, body)
            engine = state.engine(ready_wait_s)
            prepared, stream = generation.prepare_completion(engine, completion), completion.stream
        if not stream:
            result = generation.complete(engine, prepared, client_gone(request.environ))
            metrics.tokens.inc(result["usage"]["completion_tokens"])
            if result["choices"][0]["finish_reason"] == "abort":
                metrics.client_gone.inc()
            return jsonify(result)
        started = g.get("start", time.monotonic())  # the request's arrival: TTFT includes the wait
        chunks = generation.stream_chunks(engine, prepared)
        # Hold the headers until the first token: a bad request is still a 4xx and a group that
        # fails before its first token is still a 503 the gateway can retry elsewhere.
        head = _until_first_token(chunks)
        return Response(stream_with_context(_sse(head, chunks, metrics, started)),
                        mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    @bp.post("/v1/completions")
    def completions() -> Response:
        return _run("completion")

    @bp.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return _run("chat")

    @bp.get("/v1/models")
    def models() -> Response:
        engine = state.engine(ready_wait_s)
        return jsonify({"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": 0, "owned_by": "hydraserve",
            "max_model_len": engine.max_model_len}]})

    return bp


def _until_first_token(chunks: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks up to and including the first that carries tokens or ends the stream."""
    head: list[dict[str, Any]] = []
    for chunk in chunks:
        head.append(chunk)
        choice = chunk["choices"][0]
        if choice.get("token_ids") or choice.get("finish_reason") is not None:
            break
    return head


def _sse(head: list[dict[str, Any]], rest: Iterator[dict[str, Any]], metrics: RuntimeMetrics,
         started: float) -> Iterator[str]:
    """The stream as SSE; a failure after the first token ends it with an error event (the
    OpenAI client raises it as an APIError), never with a silently cut connection."""
    metrics.ttft.observe(time.monotonic() - started)
    try:
        for chunk in itertools.chain(head, rest):
            metrics.tokens.inc(len(chunk["choices"][0].get("token_ids", [])))
            yield f"data: {json.dumps(chunk)}\n\n"
    except GeneratorExit:  # the server closed us: the client went away
        metrics.client_gone.inc()
        raise
    except Exception as exc:
        error = exc if isinstance(exc, HydraError) else EngineError(f"generation failed: {type(exc).__name__}")
        log.warning("stream ended by an error: %s", error.message)
        yield f"data: {json.dumps(error.to_openai())}\n\n"
        return
    finally:
        rest.close()  # type: ignore[attr-defined]  # generator: cancels the engine request
    yield "data: [DONE]\n\n"
