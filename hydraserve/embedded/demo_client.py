"""A small client for the demo and tests: stream a completion through the gateway, timing it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests


@dataclass
class StreamResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_s: float | None = None
    total_s: float = 0.0
    status: int = 0
    error: dict[str, object] | None = None
    token_times: list[float] = field(default_factory=list)  # unix time of each chunk with tokens


def stream_completion(url: str, body: dict[str, object], *, timeout_s: float = 300.0,
                      on_text: Callable[[str], None] | None = None) -> StreamResult:
    """POST a streaming /v1/completions to ``url`` and collect text, ids and timing."""
    result = StreamResult()
    start = time.monotonic()
    with requests.post(url, json={**body, "stream": True}, stream=True, timeout=timeout_s) as r:
        result.status = r.status_code
        if r.status_code != 200:
            result.error = r.json().get("error") if r.headers.get("content-type", "").startswith(
                "application/json") else {"message": r.text}
            result.total_s = time.monotonic() - start
            return result
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: "):])
            if "error" in event:  # the stream was ended by an error event
                result.error = event["error"]
                break
            choice = event["choices"][0]
            if choice.get("token_ids"):
                result.token_times.append(time.time())
                if result.ttft_s is None:
                    result.ttft_s = time.monotonic() - start
            result.token_ids.extend(choice.get("token_ids", []))
            result.text += choice.get("text", "")
            if on_text and choice.get("text"):
                on_text(choice["text"])
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
    result.total_s = time.monotonic() - start
    return result
