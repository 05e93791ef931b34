"""The runtime's HTTP API with the real engine on a generated tiny Llama (Flask test client)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from flask.testing import FlaskClient

from hydraserve import http_events
from hydraserve.contracts import events
from hydraserve.runtime.engine.factory import load_engine
from hydraserve.runtime.engine.types import SamplingParams
from hydraserve.runtime.server.app import create_app
from hydraserve.runtime.server.state import RuntimeState


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[object]:
    eng = load_engine(tiny_llama_dir, model_name="tiny-llama")
    yield eng
    eng.shutdown(drain=False, timeout=5)


@pytest.fixture()
def client(engine: object) -> FlaskClient:
    state = RuntimeState(function_name="fn")
    state.set_engine(engine)  # type: ignore[arg-type]
    return create_app(state, max_body_bytes=64 * 1024).test_client()


def greedy_ids(engine: object, prompt: str, n: int) -> list[int]:
    ids = engine.tokenizer.encode(prompt)  # type: ignore[attr-defined]
    stream = engine.submit(ids, SamplingParams(max_tokens=n, temperature=0.0))  # type: ignore[attr-defined]
    return [t for d in stream for t in d.token_ids]


def test_completion_matches_engine_greedy(client: FlaskClient, engine: object) -> None:
    r = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.json
    body = r.json
    assert body["object"] == "text_completion"
    choice = body["choices"][0]
    assert choice["token_ids"] == greedy_ids(engine, "Once upon a time", 8)
    assert choice["finish_reason"] in ("length", "stop")
    assert body["usage"]["completion_tokens"] == len(choice["token_ids"])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + len(choice["token_ids"])


def _sse_events(raw: bytes) -> list[str]:
    return [line[len("data: "):] for line in raw.decode().split("\n") if line.startswith("data: ")]


def test_streaming_equals_non_streaming(client: FlaskClient) -> None:
    req = {"prompt": "The king", "max_tokens": 10, "temperature": 0}
    whole = client.post("/v1/completions", json=req).json["choices"][0]
    r = client.post("/v1/completions", json={**req, "stream": True})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    data = _sse_events(r.data)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == whole["token_ids"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(whole["token_ids"])


def test_chat_completion_and_stream(client: FlaskClient) -> None:
    req = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.json
    message = r.json["choices"][0]["message"]
    assert message["role"] == "assistant"
    chunks = [json.loads(d) for d in _sse_events(client.post("/v1/chat/completions",
                                                             json={**req, "stream": True}).data)[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]


def test_models_lists_the_engine(client: FlaskClient) -> None:
    data = client.get("/v1/models").json["data"]
    assert [m["id"] for m in data] == ["tiny-llama"]
    assert data[0]["max_model_len"] > 0


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 3}, "n"),
    ({"prompt": "x", "stop": ["a"] * 20}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
])
def test_bad_parameters_are_400_with_param(client: FlaskClient, body: dict[str, object], param: str) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert r.json["error"]["type"] == "invalid_request_error"
    assert r.json["error"]["param"] == param


def test_unknown_model_is_404_and_the_served_name_is_accepted(client: FlaskClient) -> None:
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"
    assert "tiny-llama" in r.json["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200


def test_malformed_json_is_400(client: FlaskClient) -> None:
    r = client.post("/v1/completions", data=b'{"prompt": "x",', content_type="application/json")
    assert r.status_code == 400
    assert "not valid JSON" in r.json["error"]["message"]
    r = client.post("/v1/completions", json=["not", "an", "object"])
    assert r.status_code == 400


def test_prompt_longer_than_context_is_400(client: FlaskClient, engine: object) -> None:
    too_long = [5] * (engine.max_model_len + 1)  # type: ignore[attr-defined]
    r = client.post("/v1/completions", json={"prompt": too_long, "max_tokens": 1})
    assert r.status_code == 400
    assert r.json["error"]["code"] == "context_length_exceeded"


def test_oversize_body_is_413_and_unknown_route_404(client: FlaskClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "x" * 100_000})
    assert r.status_code == 413 and "error" in r.json
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json["error"]["type"] == "not_found_error"


def _binary(event: CloudEvent) -> ce_http.HTTPMessage:
    return ce_http.to_binary(event, JSONFormat())


def _completion_event(data: dict[str, object], event_type: str = events.COMPLETION_REQUEST) -> CloudEvent:
    return CloudEvent(attributes={"type": event_type, "source": "/tests", "id": "evt-1",
                                  "datacontenttype": "application/json"}, data=data)


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_cloudevent_round_trip(client: FlaskClient, engine: object, mode: str) -> None:
    event = _completion_event({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0})
    message = ce_http.to_binary(event, JSONFormat()) if mode == "binary" else \
        ce_http.to_structured(event, JSONFormat())
    r = client.post("/", data=message.body, headers=message.headers)
    assert r.status_code == 200
    reply = ce_http.from_http(ce_http.HTTPMessage(headers=dict(r.headers), body=r.data), JSONFormat())
    assert reply.get_type() == events.COMPLETION_RESPONSE
    assert reply.get_subject() == "evt-1"
    assert reply.get_source() == "/hydraserve/functions/fn"
    assert ("ce-type" in {k.lower() for k in r.headers.keys()}) == (mode == "binary")
    data = reply.get_data()
    assert isinstance(data, dict)
    assert data["choices"][0]["token_ids"] == greedy_ids(engine, "Once upon a time", 5)


def test_cloudevent_chat(client: FlaskClient) -> None:
    event = _completion_event({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                              events.CHAT_REQUEST)
    message = _binary(event)
    r = client.post("/", data=message.body, headers=message.headers)
    reply = ce_http.from_http(ce_http.HTTPMessage(headers=dict(r.headers), body=r.data), JSONFormat())
    assert r.status_code == 200 and reply.get_type() == events.CHAT_RESPONSE


def test_cloudevent_errors(client: FlaskClient) -> None:
    # unknown type: an error event with a 4xx status (dead-lettered, not retried)
    message = _binary(_completion_event({"prompt": "x"}, "com.example.other"))
    r = client.post("/", data=message.body, headers=message.headers)
    assert r.status_code == 400
    reply = ce_http.from_http(ce_http.HTTPMessage(headers=dict(r.headers), body=r.data), JSONFormat())
    assert reply.get_type() == events.ERROR
    assert "unknown event type" in reply.get_data()["error"]["message"]  # type: ignore[index]
    # bad parameters inside a valid event
    message = _binary(_completion_event({"prompt": "x", "temperature": 9}))
    r = client.post("/", data=message.body, headers=message.headers)
    assert r.status_code == 400
    # not a CloudEvent at all, and a malformed one (missing id/source)
    assert client.post("/", json={"prompt": "x"}).status_code == 400
    r = client.post("/", data=b"{}", headers={"ce-specversion": "1.0", "ce-type": events.COMPLETION_REQUEST,
                                            "content-type": "application/json"})
    assert r.status_code == 400 and "malformed CloudEvent" in r.json["error"]["message"]
    r = client.post("/", data=b'{"specversion": "1.0",', content_type="application/cloudevents+json")
    assert r.status_code == 400


def test_readiness_and_failure_states(engine: object) -> None:
    state = RuntimeState()
    client = create_app(state, ready_wait_s=0.05).test_client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.headers.get("Retry-After")
    state.set_failed("no such key s3://models/m/config.json")
    assert client.get("/healthz").status_code == 500
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and "s3://models/m/config.json" in r.json["error"]["message"]
    ok = RuntimeState()
    ok.set_engine(engine)  # type: ignore[arg-type]
    ready_client = create_app(ok).test_client()
    assert ready_client.get("/readyz").status_code == 200
    ok.start_draining()
    assert ready_client.get("/readyz").status_code == 503


def test_metrics_count_requests(client: FlaskClient) -> None:
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    text = client.get("/metrics").data.decode()
    assert 'hydraserve_runtime_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert "hydraserve_runtime_generated_tokens_total 2.0" in text


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "\ud800"}, "prompt"),  # a lone surrogate: 500 before
    ({"messages": [{"role": "user", "content": "a\udfffb"}]}, "messages.0.content"),
    ({"prompt": [-5], "echo": True}, "prompt"),  # out-of-range ids echoed: 500 before
    ({"prompt": [10**30], "echo": True}, "prompt"),
    ({"prompt": [7, 10**6], "echo": True}, "prompt"),  # beyond the vocabulary
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),  # coerced before
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "temperature": "0"}, "temperature"),
    ({"prompt": [1, True]}, "prompt"),
])
def test_inputs_that_were_500s_or_coerced_are_400s(client: FlaskClient, body: dict[str, object], param: str) -> None:
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(route, data=json.dumps(body), content_type="application/json")
    assert r.status_code == 400, r.json
    assert r.json["error"]["param"].startswith(param)


def test_a_body_nested_too_deep_or_not_json_typed_is_refused(client: FlaskClient) -> None:
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = client.post("/v1/completions", data=deep, content_type="application/json")
    assert r.status_code in (400, 413) and "error" in r.json
    deep = b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # under the size limit: the depth decides
    assert client.post("/v1/completions", data=deep, content_type="application/json").status_code == 400
    plain = client.post("/v1/completions", data=b'{"prompt": "x"}', content_type="text/plain")
    assert plain.status_code == 415 and plain.json["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("missing", ["id", "specversion", "source", "type"])
@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_a_cloudevent_missing_a_required_attribute_is_400(client: FlaskClient, missing: str, mode: str) -> None:
    attributes = {"specversion": "1.0", "id": "e1", "source": "/t", "type": events.COMPLETION_REQUEST}
    del attributes[missing]
    if mode == "binary":
        headers = {f"ce-{k}": v for k, v in attributes.items()} | {"content-type": "application/json"}
        r = client.post("/", data=b'{"prompt": "x"}', headers=headers)
    else:
        body = json.dumps(attributes | {"datacontenttype": "application/json", "data": {"prompt": "x"}})
        r = client.post("/", data=body, content_type="application/cloudevents+json")
    assert r.status_code == 400 and missing in r.json["error"]["message"]


@pytest.mark.parametrize(("content_type", "status"), [
    (None, 200), ("application/json; charset=utf-8", 200),
    ("text/plain", 415), ("application/octet-stream", 415), ("application/x-www-form-urlencoded", 415)])
def test_a_binary_cloudevent_without_content_type_is_json_and_one_of_another_type_a_415(
        client: FlaskClient, content_type: str | None, status: int) -> None:
    """The SDKs send no Content-Type for an event without datacontenttype (its data is JSON); a
    non-JSON one was a 400 that did not say why."""
    headers = {"ce-specversion": "1.0", "ce-id": "e1", "ce-source": "/t", "ce-type": events.COMPLETION_REQUEST}
    if content_type is not None:
        headers["content-type"] = content_type
    r = client.post("/", data=b'{"prompt": "x", "max_tokens": 2}', headers=headers)
    reply = ce_http.from_http(ce_http.HTTPMessage(headers=dict(r.headers), body=r.data), JSONFormat())
    assert r.status_code == status, r.data
    if status == 200:
        assert reply.get_type() == events.COMPLETION_RESPONSE and reply.get_subject() == "e1"
    else:
        data = reply.get_data()
        assert reply.get_type() == events.ERROR and isinstance(data, dict)
        error = data["error"]
        assert error["code"] == "unsupported_media_type"
        assert repr(content_type) in error["message"] and error["param"] == "datacontenttype"


def test_a_binary_cloudevent_with_an_empty_content_type_is_json() -> None:
    """An empty header reaches the vLLM worker's front as sent (Flask's test client drops it, so
    this asks the parser); the SDK refused it as an empty datacontenttype (400 malformed)."""
    headers = {"ce-specversion": "1.0", "ce-id": "e1", "ce-source": "/t", "ce-type": events.COMPLETION_REQUEST,
               "content-type": ""}
    event, mode = http_events.parse_event(headers, b'{"prompt": "x"}')
    assert mode == "binary" and http_events.request_of(event) == ("/v1/completions", {"prompt": "x"})


def test_a_cloudevent_of_another_specversion_is_400(client: FlaskClient) -> None:
    headers = {"ce-specversion": "0.3", "ce-id": "e", "ce-source": "/t", "ce-type": events.COMPLETION_REQUEST,
               "content-type": "application/json"}
    r = client.post("/", data=b'{"prompt": "x"}', headers=headers)
    assert r.status_code == 400 and r.json["error"]["param"] == "specversion"


def test_a_poison_event_is_answered_so_that_it_is_dead_lettered(client: FlaskClient,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An event the engine fails on every time: an error event with 422 (Eventing does not retry
    4xx but 404/408/409/429), never a plain JSON 500 it would retry."""
    from hydraserve.runtime.server import generation

    def fails(*_args: object, **_kw: object) -> None:
        raise RuntimeError("the engine fails on this event")

    monkeypatch.setattr(generation, "complete", fails)
    message = _binary(_completion_event({"prompt": "x", "max_tokens": 2}))
    r = client.post("/", data=message.body, headers=message.headers)
    assert r.status_code == 422
    reply = ce_http.from_http(ce_http.HTTPMessage(headers=dict(r.headers), body=r.data), JSONFormat())
    assert reply.get_type() == events.ERROR and reply.get_subject() == "evt-1"
    assert reply.get_data()["error"]["type"] == "engine_error"  # type: ignore[index]
