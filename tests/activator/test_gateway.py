"""The gateway as an activator, over real HTTP: a scripted backend "starts" a small real HTTP
instance (Flask on waitress, as the runtime), and the tests act as clients do. Each test is a
problem issue 13 found in the thread-per-request gateway: health unanswered during a burst, a
413 leaking a slot, a client that left still costing compute, keep-alive and pipelining lost,
Host routing shadowing the gateway's routes, no route by model."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import requests
import yaml
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from flask import Flask, Response, jsonify, request

from hydraserve import cli, http_events
from hydraserve.activator.embedded.admin_client import GatewayAdminClient
from hydraserve.activator.embedded.gateway import MAX_BODY_BYTES, Gateway, create_gateway_app
from hydraserve.auth import write_token_file
from hydraserve.contracts import events
from hydraserve.contracts.function import FunctionConfig
from hydraserve.embedded.aio_server import BackgroundAioServer
from hydraserve.errors import ConflictError, InvalidRequestError, NotFoundError
from hydraserve.http_errors import install_error_handlers
from hydraserve.http_server import DrainingServer, client_gone
from hydraserve.processes import free_port
from hydraserve.testing.fake_backend import ScriptedBackend

ADMIN = "admin-" + "t" * 16
AUTH = {"Authorization": f"Bearer {ADMIN}"}


class Instance:
    """A function instance: answers completions at once, or streams a token every 20 ms until
    its client leaves (``gone`` is set then); answers a completion event on ``POST /`` with
    "ok", reading it as the workers do (hydraserve.http_events)."""

    def __init__(self) -> None:
        self.gone = threading.Event()
        self.requests = 0
        app = Flask("instance")
        install_error_handlers(app)

        @app.post("/")
        def cloudevent() -> Response:
            cause, mode = http_events.parse_event({k.lower(): v for k, v in request.headers.items()},
                                                  request.get_data())
            http_events.request_of(cause)  # its data must be a JSON object
            answer = {"object": "text_completion", "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]}
            headers, body = http_events.encode(http_events.reply(cause, events.SOURCE_PREFIX + "fn", answer), mode)
            return Response(body, headers=headers)

        @app.post("/v1/completions")
        def completions() -> Response:
            self.requests += 1
            body = request.get_json()
            if not body.get("stream"):
                return jsonify({"object": "text_completion", "model": body.get("model"),
                                "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}],
                                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
            environ = request.environ
            with_usage = (body.get("stream_options") or {}).get("include_usage") is True

            def tokens() -> Iterator[str]:
                gone = client_gone(environ)
                try:
                    n = body.get("max_tokens", 500)
                    for i in range(n):
                        if gone():
                            break
                        yield f"data: {json.dumps({'choices': [{'index': 0, 'text': str(i)}]})}\n\n"
                        time.sleep(0.02)
                    if with_usage:  # as vLLM: one more chunk, no choices
                        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
                        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.gone.set()

            return Response(tokens(), mimetype="text/event-stream")

        @app.post("/tokenize")
        def echo() -> Response:
            return jsonify({"host": request.host, "path": request.path})

        self.server = DrainingServer(app, "127.0.0.1", free_port()).start()


@pytest.fixture
def instance() -> Iterator[Instance]:
    inst = Instance()
    yield inst
    inst.server.close()


def serving_fn(backend: ScriptedBackend) -> Iterator[tuple[Gateway, ScriptedBackend, BackgroundAioServer]]:
    """A gateway on loopback hosting function ``fn`` (one instance at most) on ``backend``."""
    gw = Gateway(backend, reap_interval_s=3600)
    gw.register(FunctionConfig(name="fn", model_uri="s3://b/m", max_instances=1))
    server = BackgroundAioServer(create_gateway_app(gw, ADMIN), "127.0.0.1", 0).start()
    yield gw, backend, server
    backend.release_start.set()
    server.close()


@pytest.fixture
def setup(instance: Instance) -> Iterator[tuple[Gateway, ScriptedBackend, BackgroundAioServer]]:
    yield from serving_fn(ScriptedBackend(url=instance.server.url))


def settled(gw: Gateway, name: str = "fn") -> dict[str, object]:
    deadline = time.monotonic() + 5
    while gw.scaler(name).status()["inflight"] != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    return gw.scaler(name).status()


def metric(gw: Gateway, name: str, **labels: str) -> float:
    value = gw.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def test_health_and_admin_answer_while_a_burst_is_parked_and_every_request_is_then_answered(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    gw, backend, server = setup
    backend.release_start.clear()
    n = 300  # ten times the old gateway's threads; under the 1024 fds select() allows the in-process instance

    async def burst() -> tuple[list[int], list[float]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def one() -> int:
                async with session.post(f"{server.url}/functions/fn/v1/completions",
                                        json={"prompt": "x"}) as r:
                    await r.read()
                    return r.status
            parked = [asyncio.create_task(one()) for _ in range(n)]
            while gw.scaler("fn").status()["waiting"] < n:
                await asyncio.sleep(0.05)
            probes = []
            for path in ("/healthz", "/v1/functions", "/metrics") * 3:
                t0 = time.monotonic()
                async with session.get(server.url + path, timeout=aiohttp.ClientTimeout(total=5), headers=AUTH) as r:
                    assert r.status == 200
                probes.append(time.monotonic() - t0)
            backend.release_start.set()
            return await asyncio.gather(*parked), probes

    statuses, probes = asyncio.run(burst())
    assert max(probes) < 2.0, f"the gateway's own routes waited behind the burst: {probes}"
    assert statuses == [200] * n and backend.starts == 1
    assert settled(gw)["inflight"] == 0 and gw.scaler("fn").status()["waiting"] == 0


def test_a_full_queue_answers_503_with_retry_after(instance: Instance) -> None:
    backend = ScriptedBackend(url=instance.server.url, auto_release=False)
    gw = Gateway(backend, reap_interval_s=3600)
    gw.register(FunctionConfig(name="fn", model_uri="s3://b/m", max_queue=2))
    server = BackgroundAioServer(create_gateway_app(gw, ADMIN), "127.0.0.1", 0).start()
    try:
        parked = [threading.Thread(target=requests.post, args=(f"{server.url}/functions/fn/v1/completions",),
                                   kwargs={"json": {"prompt": "x"}}) for _ in range(2)]
        for t in parked:
            t.start()
        while gw.scaler("fn").status()["waiting"] < 2:
            time.sleep(0.01)
        full = requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"})
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        assert full.json()["error"]["type"] == "overloaded_error"
        backend.release_start.set()
        for t in parked:
            t.join(10)
        deadline = time.monotonic() + 5  # counted as the handler ends, just after the body went out
        while metric(gw, "hydraserve_gateway_requests_total", function="fn", status="200") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert metric(gw, "hydraserve_gateway_requests_total", function="fn", status="503") == 1
    finally:
        backend.release_start.set()
        server.close()


def test_only_the_routes_a_function_serves_wake_it(setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    """Issue 22 item 10: an unauthenticated GET of /functions/fn/favicon.ico cold-started fn."""
    gw, backend, server = setup
    for method, path in (("GET", "/functions/fn/favicon.ico"), ("GET", "/functions/fn/"), ("POST", "/functions/fn/x"),
                         ("GET", "/functions/fn/v1/completions"), ("GET", "/functions/fn/readyz")):
        refused = requests.request(method, server.url + path)
        assert refused.status_code == 404 and "POST /v1/completions" in refused.json()["error"]["message"], path
    assert backend.starts == 0 and metric(gw, "hydraserve_gateway_cold_starts_total", function="fn") == 0
    assert requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}).status_code == 200
    assert backend.starts == 1


def test_a_body_over_the_limit_is_refused_before_a_cold_start_and_takes_no_slot(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    gw, backend, server = setup
    big = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    refused = requests.post(f"{server.url}/functions/fn/v1/completions", data=big,
                            headers={"Content-Type": "application/json"})
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "payload_too_large"
    assert backend.starts == 0 and metric(gw, "hydraserve_gateway_cold_starts_total", function="fn") == 0

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is found while reading
        yield big[: len(big) // 2]
        yield big[len(big) // 2:]

    refused = requests.post(f"{server.url}/functions/fn/v1/completions", data=chunked(),
                            headers={"Content-Type": "application/json"})
    assert refused.status_code == 413 and backend.starts == 0
    assert requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}).status_code == 200
    for _ in range(3):  # at a ready instance too: the slot comes back every time
        assert requests.post(f"{server.url}/functions/fn/v1/completions", data=big).status_code == 413
    assert settled(gw)["inflight"] == 0


def test_a_client_that_leaves_mid_stream_stops_the_instance_generating(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer], instance: Instance) -> None:
    gw, _backend, server = setup
    with requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x", "stream": True},
                       stream=True, timeout=10) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith(b"data:"))
    # the client closed its connection after the first token
    assert instance.gone.wait(5), "the instance kept generating for a client that left"
    assert settled(gw)["inflight"] == 0
    assert _backend.failed == [] and len(gw.scaler("fn").instances) == 1  # the client left, not the instance
    deadline = time.monotonic() + 5
    while metric(gw, "hydraserve_gateway_client_disconnects_total", function="fn") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_client_that_leaves_while_parked_takes_no_slot(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer], instance: Instance) -> None:
    gw, backend, server = setup
    backend.release_start.clear()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        body = b'{"prompt": "x"}'
        sock.sendall(b"POST /functions/fn/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        while gw.scaler("fn").status()["waiting"] < 1:
            time.sleep(0.01)
    deadline = time.monotonic() + 5
    while gw.scaler("fn").status()["waiting"]:
        assert time.monotonic() < deadline, "the parked request outlived its client"
        time.sleep(0.01)
    backend.release_start.set()
    while gw.scaler("fn").status()["state"] != "ready":
        time.sleep(0.01)
    assert settled(gw)["inflight"] == 0 and instance.requests == 0  # never forwarded


def test_keep_alive_and_pipelined_requests_go_through_the_proxy(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    _gw, _backend, server = setup
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    sockets = []
    for _ in range(3):
        conn.request("POST", "/functions/fn/v1/completions", body=b'{"prompt": "x"}',
                     headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200 and answer.getheader("Content-Length") is not None
        assert json.loads(answer.read())["choices"][0]["text"] == "ok"
        sockets.append(conn.sock)
    assert sockets[0] is not None and sockets.count(sockets[0]) == 3, "each request needed a new connection"
    conn.close()

    one = (b"POST /functions/fn/tokenize HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(one * 3)  # pipelined: three requests before any answer
        received = b""
        while received.count(b'"path"') < 3:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {received.count(b'HTTP/1.1 200')} answers"
            received += chunk
    assert received.count(b"HTTP/1.1 200") == 3


def test_host_routing_names_only_registered_functions_and_never_shadows_the_gateway(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    gw, backend, server = setup
    unknown = requests.get(f"{server.url}/no/such/route")  # Host 127.0.0.1:port is not function "127"
    assert unknown.status_code == 404 and "'127'" not in unknown.json()["error"]["message"]
    assert "/functions/<name>/" in unknown.json()["error"]["message"]
    routed = requests.post(f"{server.url}/tokenize", json={}, headers={"Host": "fn.example.com"})
    assert routed.status_code == 200 and routed.json()["path"] == "/tokenize"
    assert requests.post(f"{server.url}/tokenize", json={}, headers={"Host": "other.example.com"}).status_code == 404
    own = requests.get(f"{server.url}/healthz", headers={"Host": "fn.example.com"})
    assert own.json() == {"status": "ok"}  # the gateway's, not the function's
    assert backend.starts == 1
    assert metric(gw, "hydraserve_gateway_requests_total", function="_unknown", status="404") == 2


def test_one_openai_endpoint_lists_the_functions_and_routes_by_model(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    gw, backend, server = setup
    gw.register(FunctionConfig(name="other", model_uri="s3://b/other"))
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)
    assert sorted(m.id for m in client.models.list()) == ["fn", "other"]
    answer = client.completions.create(model="fn", prompt="x")
    assert answer.choices[0].text == "ok" and answer.model == "fn"
    assert backend.starts == 1 and gw.scaler("other").status()["state"] == "zero"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x")
    assert isinstance(missing.value.body, dict) and missing.value.body["code"] == "model_not_found"
    deep = b'{"model": "fn", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refused = requests.post(f"{server.url}/v1/completions", data=deep, headers={"Content-Type": "application/json"})
    assert refused.status_code == 400
    typed = requests.post(f"{server.url}/v1/completions", json={"model": 5, "prompt": "x"})
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "model"


def test_cold_starts_are_counted_when_they_begin(setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    gw, backend, server = setup
    backend.release_start.clear()
    t = threading.Thread(target=requests.post, args=(f"{server.url}/functions/fn/v1/completions",),
                         kwargs={"json": {"prompt": "x"}})
    t.start()
    assert backend.started.wait(5)
    assert metric(gw, "hydraserve_gateway_cold_starts_total", function="fn") == 1  # before it is ready
    backend.release_start.set()
    t.join(10)


def test_the_admin_routes_need_the_gateway_token(setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    _gw, backend, server = setup
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
        refused = requests.get(f"{server.url}/v1/functions", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert requests.get(f"{server.url}/v1/functions/fn/timeline", headers=headers).status_code == 401
    assert requests.get(f"{server.url}/v1/functions", headers=AUTH).json()["functions"][0]["name"] == "fn"
    assert requests.get(f"{server.url}/v1/models").status_code == 200  # the public routes stay public
    assert requests.get(f"{server.url}/healthz").status_code == 200 and backend.starts == 0


def test_functions_are_created_described_and_deleted_at_run_time(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer], instance: Instance) -> None:
    gw, backend, server = setup
    admin = GatewayAdminClient(server.url, ADMIN)
    created = admin.create({"name": "second", "model_uri": "s3://b/second", "ttft_slo_s": 7.5, "concurrency": 4})
    assert created["state"] == "zero" and created["config"]["concurrency"] == 4 and backend.prepared == ["second"]
    with pytest.raises(ConflictError):
        admin.create({"name": "second", "model_uri": "s3://b/second"})
    with pytest.raises(InvalidRequestError) as bad:
        admin.create({"name": "Bad_Name", "model_uri": "s3://b/x"})
    assert bad.value.param == "name"
    with pytest.raises(InvalidRequestError) as unreadable:  # refused before anything starts
        admin.create({"name": "third", "model_uri": "s3://b/missing"})
    assert unreadable.value.param == "model_uri" and "NoSuchKey" in unreadable.value.message
    assert sorted(f["name"] for f in admin.list()) == ["fn", "second"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=10)
    assert client.completions.create(model="second", prompt="x").choices[0].text == "ok"
    described = admin.describe("second")
    assert described["state"] == "ready" and described["config"]["ttft_slo_s"] == 7.5
    assert "plan_decided" in [e["name"] for e in described["last_cold_start"]["events"]]

    streaming = requests.post(f"{server.url}/functions/second/v1/completions",
                              json={"prompt": "x", "stream": True, "max_tokens": 50},
                              stream=True, timeout=10)
    lines = streaming.iter_lines()
    next(line for line in lines if line.startswith(b"data:"))
    deleting = threading.Thread(target=lambda: gw_deleted.append(admin.delete("second")))
    gw_deleted: list[dict[str, object]] = []
    deleting.start()
    deadline = time.monotonic() + 5
    while gw.has("second"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert requests.post(f"{server.url}/v1/completions", json={"model": "second", "prompt": "x"}).status_code == 404
    assert deleting.is_alive(), "delete waits for the stream under way"
    rest = [line for line in lines if line]  # the stream under way runs to its end
    assert len(rest) == 50 and rest[-1] == b"data: [DONE]"
    deleting.join(10)
    assert gw_deleted == [{"name": "second", "deleted": True, "stopped_instances": 1}]
    assert backend.stops == ["second-1"] and [f["name"] for f in admin.list()] == ["fn"]


def test_the_fn_command_speaks_to_the_admin_api(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer], tmp_path: Path) -> None:
    _gw, _backend, server = setup
    token_file = write_token_file(tmp_path / "gateway.token", ADMIN)

    def fn(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hydraserve.cli", "fn", *args, "--gateway", server.url,
                               "--token-file", str(token_file)], capture_output=True, text=True, timeout=60)

    done = fn("create", "cli-fn", "--model", "s3://b/cli", "--ttft-slo", "7.5s", "--tpot-slo", "200ms",
              "--idle-timeout", "2m")
    assert done.returncode == 0, done.stderr
    described = fn("describe", "cli-fn")
    config = json.loads(described.stdout)["config"]
    assert (config["ttft_slo_s"], config["tpot_slo_s"], config["idle_timeout_s"]) == (7.5, 0.2, 120.0)
    assert "cli-fn" in fn("list").stdout
    assert fn("delete", "cli-fn").returncode == 0
    missing = fn("describe", "cli-fn")
    assert missing.returncode != 0 and "unknown function 'cli-fn'" in missing.stderr
    assert fn("create", "x", "--model", "s3://b/x", "--ttft-slo", "soon").returncode == 2  # not a duration


def test_an_update_reaches_the_next_cold_start_while_the_running_instance_serves_on(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    _gw, backend, server = setup
    admin = GatewayAdminClient(server.url, ADMIN)
    assert requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}).status_code == 200
    updated = admin.update("fn", {"ttft_slo_s": 5.0, "model_uri": "s3://b/m2", "concurrency": 1, "max_instances": 2})
    assert updated["changed"]["ttft_slo_s"] == {"from": 7.5, "to": 5.0} and "tpot_slo_s" not in updated["changed"]
    assert backend.prepared == ["fn"] and len(updated["instances"]) == 1  # the new model read; the instance kept
    stream = requests.post(f"{server.url}/functions/fn/v1/completions", stream=True, timeout=10,
                           json={"prompt": "x", "stream": True, "max_tokens": 50})
    lines = stream.iter_lines()  # kept: a dropped generator closes the connection, ending the stream
    assert next(lines).startswith(b"data: ") and backend.starts == 1  # the old instance serves it
    # its one slot (concurrency 1 now) is taken: the next request needs a second instance (max 2 now)
    assert requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}).status_code == 200
    assert len([line for line in lines if line.startswith(b"data: {")]) == 49  # the stream ran to its end on the old instance
    first, second = backend.started_with
    assert (first.ttft_slo_s, first.model_uri) == (7.5, "s3://b/m")
    assert (second.ttft_slo_s, second.model_uri, second.concurrency) == (5.0, "s3://b/m2", 1)
    assert backend.stops == [] and admin.describe("fn")["config"]["model_uri"] == "s3://b/m2"


def test_a_bad_update_is_a_400_naming_the_field_and_changes_nothing(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    gw, backend, server = setup
    admin = GatewayAdminClient(server.url, ADMIN)
    before = gw.scaler("fn").config
    for fields, param, says in (({"ttft_slo_s": -1, "concurrency": 4}, "ttft_slo_s", "ttft_slo_s: Input should be"),
                                ({"concurency": 4}, "concurency", "not a function setting"),  # not ignored
                                ({"name": "other"}, "name", "cannot be renamed"),
                                ({"min_pipeline_size": 3, "max_pipeline_size": 2}, None, "min_pipeline_size 3"),
                                ({"model_uri": "/tmp/m"}, "model_uri", "hydraserve model push"),
                                ({"model_uri": "s3://b/missing", "concurrency": 4}, "model_uri", "NoSuchKey")):
        with pytest.raises(InvalidRequestError) as bad:
            admin.update("fn", fields)
        assert bad.value.param == param and says in bad.value.message, bad.value
    raw = requests.patch(f"{server.url}/v1/functions/fn", headers=AUTH, json=[1])
    assert raw.status_code == 400 and "JSON object" in raw.json()["error"]["message"]
    with pytest.raises(NotFoundError, match="unknown function 'ghost'"):
        admin.update("ghost", {"concurrency": 4})
    assert gw.scaler("fn").config == before
    assert requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}).status_code == 200
    assert backend.started_with == [before]


def test_logs_are_each_workers_tail_and_a_bad_tail_is_a_400(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    _gw, backend, server = setup
    admin = GatewayAdminClient(server.url, ADMIN)
    backend.log_lines = [json.dumps({"level": "info", "msg": f"line {i}"}) for i in range(300)]
    assert admin.logs("fn") == []  # at zero: no worker
    assert requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}).status_code == 200
    (worker,) = admin.logs("fn")
    assert (worker["instance"], worker["stage"], worker["node"]) == ("fn-1", 0, "fake-node")
    assert worker["log"].splitlines() == backend.log_lines[-200:]  # the default tail
    assert admin.logs("fn", tail=3)[0]["log"].splitlines() == backend.log_lines[-3:]
    for tail in ("0", "10001", "-5", "many"):
        refused = requests.get(f"{server.url}/v1/functions/fn/logs", params={"tail": tail}, headers=AUTH)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tail", tail
    assert requests.get(f"{server.url}/v1/functions/ghost/logs", headers=AUTH).status_code == 404
    assert requests.get(f"{server.url}/v1/functions/fn/logs").status_code == 401


def test_the_fn_command_updates_reads_logs_and_prints_json_and_yaml(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    _gw, backend, server = setup
    token_file = write_token_file(tmp_path / "gateway.token", ADMIN)

    def fn(*args: str) -> tuple[int, str, str]:
        code = cli.main(["fn", *args, "--gateway", server.url, "--token-file", str(token_file)])
        out, err = capsys.readouterr()
        return code, out, err

    assert requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}).status_code == 200
    code, out, _ = fn("update", "fn", "--ttft-slo", "5s", "--idle-timeout", "2m")
    assert code == 0 and "ttft_slo_s 7.5 -> 5.0" in out and "idle_timeout_s 30.0 -> 120.0" in out
    assert "the 1 instance(s) running keep serving" in out
    code, _, err = fn("update", "fn", "--concurrency", "-1")
    assert code == 1 and "concurrency" in err

    code, out, _ = fn("list", "-o", "json")
    listed = json.loads(out)
    assert code == 0 and [f["name"] for f in listed] == ["fn"] and listed[0]["instances"][0]["id"] == "fn-1"
    code, out, _ = fn("list", "-o", "yaml")
    assert code == 0 and out.startswith("- name: fn\n") and yaml.safe_load(out) == listed  # YAML, not JSON
    code, out, _ = fn("describe", "fn", "-o", "yaml")
    described = yaml.safe_load(out)
    assert described["config"]["ttft_slo_s"] == 5.0 and "plan_decided" in [
        e["name"] for e in described["last_cold_start"]["events"]]
    code, out, _ = fn("describe", "fn", "-o", "json")
    assert json.loads(out)["config"] == described["config"]

    backend.log_lines = ['{"level": "info", "msg": "listening"}', '{"level": "info", "msg": "worker ready"}']
    code, out, _ = fn("logs", "fn", "--tail", "1")
    assert code == 0 and out.splitlines() == ["==> instance fn-1 stage 0 on fake-node (running) <==",
                                              '{"level": "info", "msg": "worker ready"}']
    code, _, err = fn("logs", "fn", "--tail", "0")
    assert code == 1 and "tail" in err


def test_fn_create_with_a_local_directory_pushes_it_checked_then_creates_the_function(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer], tmp_path: Path, tiny_llama_dir: Path,
        s3_server: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is pushed to s3://BUCKET/NAME (the real S3 protocol) before the function is
    created with that URI; a directory the engine cannot serve is refused before a byte goes."""
    import shutil

    gw, _backend, server = setup
    for key, value in s3_server.client_env().items():
        monkeypatch.setenv(key, value)
    token_file = write_token_file(tmp_path / "gateway.token", ADMIN)
    common = ["--gateway", server.url, "--token-file", str(token_file), "--endpoint-url", s3_server.endpoint_url,
              "--bucket", "fn-create-push"]
    assert cli.main(["fn", "create", "pushed", "--model", str(tiny_llama_dir), *common]) == 0
    _out, err = capsys.readouterr()
    assert "pushing" in err and gw.scaler("pushed").config.model_uri == "s3://fn-create-push/pushed"
    stored = {o.key.rsplit("/", 1)[-1] for o in s3_server.client().list_prefix("fn-create-push", "pushed/")}
    assert {"config.json", "tokenizer.json", "model.safetensors", "hydraserve-manifest.json"} <= stored
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "tokenizer.json").unlink()
    assert cli.main(["fn", "create", "broken", "--model", str(broken), *common]) == 1
    assert "has no tokenizer.json" in capsys.readouterr().err and not gw.has("broken")
    assert s3_server.client().list_prefix("fn-create-push", "broken/") == []


def test_a_malformed_chunked_body_or_contradictory_config_is_a_400(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    _gw, backend, server = setup
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /functions/fn/v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\nzz\r\n")
        answer = sock.recv(65536)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]  # the parser refuses it
    contradictory = requests.post(f"{server.url}/v1/functions", headers=AUTH, json={
        "name": "odd", "model_uri": "s3://b/odd", "min_pipeline_size": 3, "max_pipeline_size": 2})
    assert contradictory.status_code == 400 and "min_pipeline_size" in contradictory.json()["error"]["message"]
    assert backend.starts == 0
    endless = requests.post(f"{server.url}/v1/functions", headers=AUTH | {"Content-Type": "application/json"},
                            data=b'{"name": "endless", "model_uri": "s3://b/e", "idle_timeout_s": Infinity}')
    assert endless.status_code == 400 and "Infinity is not a JSON value" in endless.json()["error"]["message"]
    forever = requests.post(f"{server.url}/v1/functions", headers=AUTH, data=b'{"name": "forever", "model_uri": '
                            b'"s3://b/f", "idle_timeout_s": 1e999}')
    assert forever.status_code == 400 and "1e999 is out of range" in forever.json()["error"]["message"]
    local = requests.post(f"{server.url}/v1/functions", headers=AUTH, json={"name": "local", "model_uri": "/tmp/m"})
    assert local.status_code == 400 and "hydraserve model push" in local.json()["error"]["message"]
    listed = requests.get(f"{server.url}/v1/functions", headers=AUTH)
    assert not {"endless", "forever", "local"} & set(listed.text.split("\"")) and listed.json()  # valid JSON


def test_idle_connections_are_closed_and_cannot_exhaust_the_gateway(instance: Instance) -> None:
    """Issue 22 item 5: idle connections were never closed (20,000 took every descriptor and
    /healthz timed out). Past its connection limit the gateway closes idle ones, oldest first,
    never one with a request under way; each idle one closes after the idle timeout anyway."""
    backend = ScriptedBackend(url=instance.server.url)
    gw = Gateway(backend, reap_interval_s=3600)
    gw.register(FunctionConfig(name="fn", model_uri="s3://b/m", max_instances=1))
    server = BackgroundAioServer(create_gateway_app(gw, ADMIN), "127.0.0.1", 0, idle_timeout_s=3,
                                 max_connections=200).start()
    held: list[socket.socket] = []
    try:
        streaming = requests.post(f"{server.url}/functions/fn/v1/completions", stream=True, timeout=30,
                                  json={"prompt": "x", "stream": True, "max_tokens": 150})  # 3 s of tokens
        lines = streaming.iter_lines()
        assert next(line for line in lines if line.startswith(b"data:")).startswith(b"data: ")
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(600)]
        waits = []
        for _ in range(20):
            started = time.monotonic()
            assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
            waits.append(time.monotonic() - started)
        assert max(waits) < 1.0, waits
        assert held[0].recv(1) == b""  # the oldest idle ones were closed (past the limit)
        rest = [line for line in lines if line.startswith(b"data: {")]
        assert len(rest) == 149 and b'"text": "149"' in rest[-1], rest[-2:]  # the stream under way: whole
        held[-1].settimeout(10)
        assert held[-1].recv(1) == b""  # and the newest after the idle timeout
    finally:
        for sock in held:
            sock.close()
        backend.release_start.set()
        server.close()


def test_stopping_ends_every_stream_and_parked_request_within_the_drain(instance: Instance) -> None:
    """Issue 22 item 9: stopping `up` cut 94 of 150 streams with neither an error event nor
    [DONE], and took 65.9 s for a 30 s drain (aiohttp waits the shutdown timeout out twice).
    Now streams still running when the drain ends get a retryable error event and their end,
    a request parked behind a cold start a 503, all within the drain time and a moment."""
    backend = ScriptedBackend(url=instance.server.url)
    gw = Gateway(backend, reap_interval_s=3600, drain_timeout_s=1.0)
    gw.register(FunctionConfig(name="fn", model_uri="s3://b/m", max_instances=1, concurrency=8))
    gw.register(FunctionConfig(name="cold", model_uri="s3://b/c", max_instances=1))
    server = BackgroundAioServer(create_gateway_app(gw, ADMIN), "127.0.0.1", 0, drain_timeout_s=1.0).start()
    streams = [requests.post(f"{server.url}/functions/fn/v1/completions", stream=True, timeout=30,
                             json={"prompt": "x", "stream": True, "max_tokens": 500}) for _ in range(5)]  # 10 s each
    backend.release_start.clear()
    parked: list[requests.Response] = []
    parking = threading.Thread(target=lambda: parked.append(requests.post(
        f"{server.url}/functions/cold/v1/completions", json={"prompt": "x"}, timeout=30)))
    parking.start()
    deadline = time.monotonic() + 5
    while gw.scaler("cold").status()["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    closing = threading.Thread(target=server.close)
    closing.start()
    lines = [[line for line in r.iter_lines() if line] for r in streams]
    parking.join(30)
    took = time.monotonic() - started  # until every client had its answer
    backend.release_start.set()  # the cold start blocked in the backend (a thread) may end now
    closing.join(30)
    assert took < 3.0, (took, [len(received) for received in lines])  # the 1 s drain, then the ending
    for received in lines:
        assert 10 < len(received) < 500  # cut short, by the drain
        error = json.loads(received[-1][len(b"data: "):])["error"]
        assert error["retryable"] is True and "gateway is stopping" in error["message"]
    assert parked[0].status_code == 503 and parked[0].json()["error"]["retryable"] is True


# CloudEvents ------------------------------------------------------------------------------

DOC = Path(__file__).parents[2] / "docs" / "CLOUDEVENTS.md"


def post_event(url: str, mode: str, data: dict[str, object] | None = None) -> requests.Response:
    """A completion event (no datacontenttype: in binary mode, no Content-Type, as the SDKs send it)."""
    event = CloudEvent({"type": events.COMPLETION_REQUEST, "source": "/tests", "id": "evt-1"}, data or {"prompt": "x"})
    message = ce_http.to_binary(event, JSONFormat()) if mode == "binary" else ce_http.to_structured(event, JSONFormat())
    return requests.post(url, data=message.body, headers=message.headers, timeout=10)


def answered_event(r: requests.Response, mode: str, event_type: str = events.ERROR) -> BaseCloudEvent:
    """The event ``r`` carries, read by the SDK, checked to be of ``event_type`` and in ``mode``."""
    assert ("ce-type" in {k.lower() for k in r.headers}) == (mode == "binary"), r.headers
    if mode == "structured":
        assert r.headers["Content-Type"].startswith("application/cloudevents+json")
    event = ce_http.from_http(ce_http.HTTPMessage(dict(r.headers), r.content), JSONFormat())
    assert event.get_type() == event_type and event.get_id() != "evt-1", r.content
    return event


def error_of(event: BaseCloudEvent) -> dict[str, Any]:
    """An error event's OpenAI error."""
    data = event.get_data()
    assert isinstance(data, dict)
    return data["error"]


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_an_event_the_gateway_refuses_is_answered_with_an_error_event_in_its_mode(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer], mode: str) -> None:
    """Issue 21 item 6: the gateway answered events with plain JSON errors, which a broker cannot
    read as a reply; a plain request keeps its JSON error."""
    _gw, backend, server = setup
    unknown = post_event(f"{server.url}/functions/nope/", mode)
    event = answered_event(unknown, mode)
    assert unknown.status_code == 404 and error_of(event)["type"] == "not_found_error"
    assert event.get_source() == events.GATEWAY_SOURCE and event.get_subject() == "evt-1"
    unserved = post_event(f"{server.url}/functions/fn/nope", mode)  # a route fn does not serve
    event = answered_event(unserved, mode)
    assert unserved.status_code == 404 and event.get_source() == events.SOURCE_PREFIX + "fn"
    big = post_event(f"{server.url}/functions/fn/", mode, {"prompt": "x" * MAX_BODY_BYTES})
    event = answered_event(big, mode)
    assert big.status_code == 413 and error_of(event)["code"] == "payload_too_large"
    assert event.get_subject() == ("evt-1" if mode == "binary" else None)  # a structured body refused unread
    plain = requests.post(f"{server.url}/functions/nope/v1/completions", json={"prompt": "x"}, timeout=10)
    assert plain.status_code == 404 and plain.json()["error"]["type"] == "not_found_error"
    assert not any(k.lower().startswith("ce-") for k in plain.headers)
    assert backend.starts == 0


def test_an_event_whose_function_fails_to_start_gets_a_503_error_event_with_retry_after(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    _gw, backend, server = setup
    for mode in ("binary", "structured"):
        backend.fail_next = "worker exited with code 1: bad weights"
        failed = post_event(f"{server.url}/functions/fn/", mode)
        event = answered_event(failed, mode)
        assert failed.status_code == 503 and int(failed.headers["Retry-After"]) >= 1  # the start's backoff
        error = error_of(event)
        assert error["type"] == "service_unavailable" and error["retryable"] and "bad weights" in error["message"]
        assert event.get_source() == events.SOURCE_PREFIX + "fn" and event.get_subject() == "evt-1"
    backend.fail_next = "bad weights"
    plain = requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}, timeout=10)
    assert plain.status_code == 503 and int(plain.headers["Retry-After"]) >= 1
    assert plain.json()["error"]["type"] == "service_unavailable" and backend.starts == 3


def test_a_binary_event_without_content_type_reaches_the_function_as_json(
        setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer]) -> None:
    """The gateway forwarded it as application/octet-stream (aiohttp's default), so the worker
    read its data as text and refused it with a 400."""
    _gw, _backend, server = setup
    served = post_event(f"{server.url}/functions/fn/", "binary")
    assert "content-type" not in {k.lower() for k in served.request.headers}
    reply = answered_event(served, "binary", events.COMPLETION_RESPONSE)
    assert served.status_code == 200 and reply.get_subject() == "evt-1"


def doc_example(imports: str) -> str:
    """The python block of docs/CLOUDEVENTS.md that contains ``imports``, as written there."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if imports in b]
    assert len(blocks) == 1, f"{len(blocks)} blocks with {imports!r} in {DOC}"
    return blocks[0]


@pytest.mark.parametrize("sdk", ["2.x", "1.x"])
def test_the_documented_sdk_examples_work(setup: tuple[Gateway, ScriptedBackend, BackgroundAioServer], sdk: str,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The docs' client examples run as written (2.x ships 1.x's API as ``cloudevents.v1``: the
    1.x example runs with that prefix), against a function and against one that does not exist."""
    _gw, _backend, server = setup
    if sdk == "2.x":
        code = doc_example("from cloudevents.core")
    else:
        code = doc_example("from cloudevents.conversion").replace("from cloudevents.", "from cloudevents.v1.")
    example = compile(code, str(DOC), "exec")
    monkeypatch.setenv("FUNCTION_URL", f"{server.url}/functions/fn/")
    exec(example, {})
    assert capsys.readouterr().out.split() == ["ok", "ok"]  # binary, then structured
    monkeypatch.setenv("FUNCTION_URL", f"{server.url}/functions/nope/")
    with pytest.raises(RuntimeError, match="404 not_found_error: unknown function 'nope'"):
        exec(example, {})
