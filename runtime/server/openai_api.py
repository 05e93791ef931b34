"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (JSON or SSE), /v1/models."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, stream_with_context

from hydraserve.http_json import read_json, validate
from hydraserve.runtime.server import generation
from hydraserve.runtime.server.metrics import RuntimeMetrics
from hydraserve.runtime.server.schemas import ChatCompletionRequest, CompletionRequest
from hydraserve.runtime.server.state import RuntimeState


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
            result = generation.complete(engine, prepared)
            metrics.tokens.inc(result["usage"]["completion_tokens"])
            return jsonify(result)
        chunks = generation.stream_chunks(engine, prepared)
        first = next(chunks)  # submit now, so validation errors still become 4xx JSON
        return Response(stream_with_context(_sse([first], chunks, metrics)),
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


def _sse(head: list[dict[str, Any]], rest: Iterator[dict[str, Any]],
         metrics: RuntimeMetrics) -> Iterator[str]:
    start = time.monotonic()
    first_token_seen = False
    try:
        for chunk in head:
            yield f"data: {json.dumps(chunk)}\n\n"
        for chunk in rest:
            n = len(chunk["choices"][0].get("token_ids", []))
            if n and not first_token_seen:
                metrics.ttft.observe(time.monotonic() - start)
                first_token_seen = True
            metrics.tokens.inc(n)
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        rest.close()  # type: ignore[attr-defined]  # generator: cancels the engine request
