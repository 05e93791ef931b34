"""The gateway when instances fail: the gateway over real HTTP in front of small real HTTP
instances that misbehave on purpose (answer 503 instance_failed, refuse connections, break a
stream off), the scripted backend bringing them "up". Checked with the openai client: a request
that has no token yet is answered by a fresh instance, a stream under way ends with an error
the client raises, and nothing stays in flight."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import openai
import pytest
from flask import Flask, Response, jsonify

from hydraserve.activator.embedded.gateway import Gateway, create_gateway_app
from hydraserve.activator.embedded.relay import MAX_INSTANCE_RETRIES
from hydraserve.contracts.function import FunctionConfig
from hydraserve.embedded.aio_server import BackgroundAioServer
from hydraserve.errors import InstanceFailedError
from hydraserve.http_server import DrainingServer
from hydraserve.processes import free_port
from hydraserve.testing.fake_backend import ScriptedBackend


def chunk(text: str, finish: str | None = None) -> str:
    body = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    return f"data: {json.dumps(body)}\n\n"


def instance(mode: str) -> DrainingServer:
    """An instance that answers well ("ok"), says its group broke ("failed"), or streams one
    token and then dies mid-body ("breaks")."""
    app = Flask(f"instance-{mode}")

    @app.post("/v1/completions")
    def completions() -> Response:
        if mode == "failed":
            response = jsonify(InstanceFailedError("worker failed: pipeline group: stage 1 went away").to_openai())
            response.status_code = 503
            return response

        def body() -> Iterator[str]:
            yield chunk("Hello")
            if mode == "breaks":
                raise ConnectionResetError("the head died")  # the server cuts the chunked body off
            yield chunk(" world", finish="length")
            yield "data: [DONE]\n\n"

        return Response(body(), mimetype="text/event-stream")

    return DrainingServer(app, "127.0.0.1", free_port()).start()


@pytest.fixture
def gateway() -> Iterator[tuple[Gateway, ScriptedBackend, str]]:
    backend = ScriptedBackend()
    gw = Gateway(backend, reap_interval_s=3600)  # the reaper stays out of these tests
    gw.register(FunctionConfig(name="fn", model_uri="s3://b/m"))
    server = BackgroundAioServer(create_gateway_app(gw, "admin-" + "t" * 16), "127.0.0.1", 0).start()
    gw.server = server  # type: ignore[attr-defined]  # for tests that act on the gateway's loop
    yield gw, backend, server.url
    server.close()


@pytest.fixture
def instances() -> Iterator[dict[str, DrainingServer]]:
    servers = {mode: instance(mode) for mode in ("ok", "failed", "breaks")}
    yield servers
    for s in servers.values():
        s.close()


def settled(gw: Gateway) -> dict[str, object]:
    """The function's status once the last body's on_done ran (it runs after the client read)."""
    deadline = time.monotonic() + 5
    while gw.scaler("fn").status()["inflight"] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return gw.scaler("fn").status()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/functions/fn/v1", api_key="unused", max_retries=0, timeout=30)


def stream_text(url: str) -> str:
    return "".join(c.choices[0].text for c in client(url).completions.create(model="m", prompt="x", stream=True))


def test_a_request_refused_by_a_failed_instance_is_answered_by_a_fresh_one(
        gateway: tuple[Gateway, ScriptedBackend, str], instances: dict[str, DrainingServer]) -> None:
    gw, backend, url = gateway
    backend.next_urls = [instances["failed"].url, instances["ok"].url]
    assert stream_text(url) == "Hello world"
    assert backend.starts == 2 and [i for i, _ in backend.failed] == ["fn-1"]
    assert "stage 1 went away" in backend.failed[0][1]
    status = settled(gw)
    assert status["inflight"] == 0 and status["instance_failures"] == 1


def test_an_instance_that_does_not_answer_at_all_is_replaced_too(
        gateway: tuple[Gateway, ScriptedBackend, str], instances: dict[str, DrainingServer]) -> None:
    gw, backend, url = gateway
    backend.next_urls = [f"http://127.0.0.1:{free_port()}", instances["ok"].url]  # nothing listens there
    answer = client(url).completions.create(model="m", prompt="x", stream=True)
    assert "".join(c.choices[0].text for c in answer) == "Hello world"
    assert [i for i, _ in backend.failed] == ["fn-1"] and settled(gw)["inflight"] == 0


def test_a_stream_broken_off_after_its_first_token_ends_with_an_error_the_client_raises(
        gateway: tuple[Gateway, ScriptedBackend, str], instances: dict[str, DrainingServer]) -> None:
    gw, backend, url = gateway
    backend.next_urls = [instances["breaks"].url, instances["ok"].url]
    received: list[str] = []
    with pytest.raises(openai.APIError, match="broke off the response"):
        for c in client(url).completions.create(model="m", prompt="x", stream=True):
            received.append(c.choices[0].text)
    assert received == ["Hello"]  # what it had said stays said; it is not sent again
    deadline = time.monotonic() + 5  # failed in the background once the client had its error
    while not backend.failed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [i for i, _ in backend.failed] == ["fn-1"]  # the instance is failed, not reused
    assert stream_text(url) == "Hello world" and backend.starts == 2
    assert settled(gw)["inflight"] == 0


def test_a_request_every_instance_fails_gets_the_503_after_its_retries(
        gateway: tuple[Gateway, ScriptedBackend, str], instances: dict[str, DrainingServer]) -> None:
    gw, backend, url = gateway
    backend.url = instances["failed"].url
    with pytest.raises(openai.InternalServerError) as failed:
        client(url).completions.create(model="m", prompt="x")
    assert failed.value.status_code == 503
    assert backend.starts == MAX_INSTANCE_RETRIES + 1
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "instance_failed"
    assert settled(gw)["inflight"] == 0


def test_concurrent_requests_on_one_failed_instance_fail_it_once(
        gateway: tuple[Gateway, ScriptedBackend, str], instances: dict[str, DrainingServer]) -> None:
    gw, backend, url = gateway
    backend.next_urls = [instances["failed"].url]
    backend.url = instances["ok"].url
    server: BackgroundAioServer = gw.server  # type: ignore[attr-defined]
    scaler = gw.scaler("fn")
    scaler.release(server.call(scaler.acquire()))  # bring the failing instance up first, then send 4 at once
    texts: list[str] = []
    threads = [threading.Thread(target=lambda: texts.append(stream_text(url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert texts == ["Hello world"] * 4
    assert [i for i, _ in backend.failed] == ["fn-1"] and backend.starts == 2
