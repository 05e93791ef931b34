"""The usage tap (activator/embedded/usage.py) on answers cut anywhere: what it passes on and what it reads."""

from __future__ import annotations

import json

import pytest

from hydraserve.activator.embedded.usage import UsageTap
from hydraserve.activator.embedded.usage import ask_for_usage as ask_for
from hydraserve.activator.embedded.waiting import streamed_request

CHUNKS = [{"choices": [{"index": 0, "text": str(i)}]} for i in range(3)]
USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}
STREAM = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in [*CHUNKS, USAGE]) + b"data: [DONE]\n\n"


def through(tap: UsageTap, body: bytes, size: int) -> bytes:
    out = b"".join(tap.feed(body[i:i + size]) for i in range(0, len(body), size))
    return out + tap.end()


@pytest.mark.parametrize("size", [1, 7, 64, len(STREAM)])
def test_a_stream_cut_anywhere_is_passed_on_whole_and_its_usage_read(size: int) -> None:
    kept = UsageTap("text/event-stream", drop_usage_chunk=False)
    assert through(kept, STREAM, size) == STREAM and kept.usage == (7, 3)
    dropped = UsageTap("text/event-stream", drop_usage_chunk=True)
    assert through(dropped, STREAM, size) == STREAM.replace(f"data: {json.dumps(USAGE)}\n\n".encode(), b"")
    assert dropped.usage == (7, 3)


def test_a_json_answer_is_passed_on_untouched_and_its_usage_read() -> None:
    body = json.dumps({"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}).encode()
    tap = UsageTap("application/json", drop_usage_chunk=True)
    assert through(tap, body, 5) == body and tap.usage == (2, 1)


def ask_for_usage(method: str, path: str, body: bytes) -> tuple[bytes, bool]:
    """The gateway's two steps: the request read once, then asked for usage if it streams."""
    return ask_for(body, streamed_request(method, path, body))


def test_only_a_stream_that_did_not_ask_for_usage_is_asked_for_it() -> None:
    path = "/v1/completions"
    body, injected = ask_for_usage("POST", path, b'{"prompt": "x", "stream": true}')
    assert injected and json.loads(body)["stream_options"] == {"include_usage": True}
    asked = b'{"stream": true, "stream_options": {"include_usage": true}}'
    for args in (("POST", path, asked), ("POST", path, b'{"stream": false}'), ("POST", "/", b'{"stream": true}'),
                 ("POST", path, b"not json"), ("POST", path, b'{"stream": true, "stream_options": 3}')):
        assert ask_for_usage(*args) == (args[2], False), args
