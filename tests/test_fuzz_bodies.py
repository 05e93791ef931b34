"""No body gives a 500: hypothesis throws JSON (and not-quite-JSON) at every route that takes a
body, on the real apps (a worker's front over the compact engine on a tiny Llama, the placement service,
loaderd, the gateway's admin and OpenAI routes). Each answer is either a success or a 4xx in
OpenAI's error shape; bounded in examples and time."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import requests
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hydraserve.activator.embedded.gateway import Gateway, create_gateway_app
from hydraserve.contracts import events
from hydraserve.embedded.aio_server import BackgroundAioServer
from hydraserve.testing.fake_backend import ScriptedBackend

TOKEN = "fuzz-" + "t" * 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.none() | st.booleans() | st.integers(-10, 10) | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)


def bodies(keys: list[str]) -> st.SearchStrategy[Any]:
    """Objects with the route's own keys (so validation is reached) holding any values, plus junk."""
    known = st.fixed_dictionaries({}, optional={k: values for k in keys})
    return known | values


def check(status: int, body: bytes) -> None:
    assert status < 500 or status == 503, (status, body[:300])
    if status >= 400:
        assert "error" in json.loads(body), body[:300]


@pytest.fixture(scope="module")
def runtime(tiny_llama_dir: Path) -> Iterator[Client]:
    """A worker's front (vLLM's OpenAI app behind our strict door) over the compact engine that
    answers a worker's first requests, served by uvicorn on loopback; no vLLM engine follows, so a
    request the compact engine does not take is a retryable 503 (as when vLLM's fails to start)."""
    import asyncio
    import threading

    import uvicorn
    from vllm.exceptions import RetryableRequestError

    from hydraserve.contracts.timeline import Timeline
    from hydraserve.contracts.worker import WorkerEnvironment
    from hydraserve.processes import free_port
    from hydraserve.runtime.serving.first_token import start_first_token_server
    from hydraserve.runtime.serving.front import Front
    from hydraserve.runtime.serving.state import ServingState
    from hydraserve.weights.model_files import open_model

    port = free_port()
    held: dict[str, Any] = {}
    up = threading.Event()

    async def serve() -> None:
        settings = WorkerEnvironment(model_uri=str(tiny_llama_dir), function="fn", dtype="float32", max_batch=4)
        server, held["source"] = await start_first_token_server(settings, open_model(str(tiny_llama_dir)),
                                                                tiny_llama_dir, Timeline())
        server.engine.no_successor(RetryableRequestError("no vLLM engine in this test"))
        state: ServingState[Any] = ServingState("fn")
        state.set_serving(server)
        held["server"] = server
        held["uvicorn"] = uvicorn.Server(uvicorn.Config(Front(state, max_body_bytes=64 * 1024), host="127.0.0.1",
                                                        port=port, lifespan="off", log_level="warning"))
        up.set()
        await held["uvicorn"].serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert up.wait(60)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not held["uvicorn"].started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield Client(url)
    held["uvicorn"].should_exit = True
    thread.join(10)
    held["server"].shutdown()
    held["source"].close()


class Answer(NamedTuple):
    status_code: int
    data: bytes


class Client:
    """The calls the fuzz makes, over real HTTP, answered as Flask's test client answers them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def post(self, path: str, data: str, content_type: str | None = None,
             headers: dict[str, str] | None = None) -> Answer:
        headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
        r = self.session.post(self.url + path, data=data, headers=headers, timeout=60)
        return Answer(r.status_code, r.content)


SAMPLING = ["model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "ignore_eos", "n"]


def small(body: Any) -> Any:
    """Keep generation short: a fuzzed max_tokens that validates would run for a while."""
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = max(-1, min(body["max_tokens"], 4))
    return body


@FUZZ
@given(body=bodies(["prompt", "echo", "logprobs", *SAMPLING]))
def test_completions(runtime: Client, body: Any) -> None:
    r = runtime.post("/v1/completions", data=json.dumps(small(body)), content_type="application/json")
    check(r.status_code, r.data)


@FUZZ
@given(body=bodies(["messages", *SAMPLING]))
def test_chat_completions(runtime: Client, body: Any) -> None:
    r = runtime.post("/v1/chat/completions", data=json.dumps(small(body)), content_type="application/json")
    check(r.status_code, r.data)


@FUZZ
@given(data=bodies(["prompt", "messages", *SAMPLING]), attributes=bodies(["id", "source", "type", "specversion"]),
       kind=st.sampled_from([events.COMPLETION_REQUEST, events.CHAT_REQUEST, "x"]))
def test_cloudevents(runtime: Client, data: Any, attributes: Any, kind: str) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/f", "ce-type": kind,
               "content-type": "application/json"}
    r = runtime.post("/", data=json.dumps(small(data)), headers=headers)
    check(r.status_code, r.data)
    if isinstance(attributes, dict):
        attributes = attributes | {"data": small(data)}
    r = runtime.post("/", data=json.dumps(attributes), content_type="application/cloudevents+json")
    check(r.status_code, r.data)


@FUZZ
@given(route=st.sampled_from(["/v1/nodes", "/v1/plan", "/v1/reports"]),
       body=bodies(["name", "gpus", "gpu_memory_gb", "nic_gbps", "loaderd_url", "function", "plan_id", "event",
                    "stage", "timings", "dry_run"]))
def test_placement(route: str, body: Any) -> None:
    from hydraserve.provider.api import create_app
    from hydraserve.provider.service import PlacementService

    client = create_app(PlacementService("ours"), TOKEN).test_client()
    r = client.post(route, data=json.dumps(body), content_type="application/json", headers=AUTH)
    check(r.status_code, r.data)


@pytest.fixture(scope="module")
def loaderd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    from hydraserve.auth import NodeKeys, node_admin_token
    from hydraserve.loaderd.api import create_app
    from hydraserve.loaderd.service import LoaderConfig, LoaderService
    from tests.loaderd.conftest import LocalStores, llama_like, write_manifest, write_model

    root = write_model(tmp_path_factory.mktemp("fuzz") / "m", llama_like(layers=2))
    write_manifest(root, per_tensor=True)
    node = f"fz{uuid.uuid4().hex[:8]}"
    service = LoaderService(LoaderConfig(node_name=node, budget_bytes=64 << 20),
                            open_model=LocalStores({"s3://bucket/model": root}))
    client = create_app(service, NodeKeys.derive(TOKEN, node)).test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {node_admin_token(TOKEN, node)}"  # this node's own
    assert client.get("/v1/status").status_code == 200  # the fuzz gets past the token check
    yield client
    service.close()


@FUZZ
@given(route=st.sampled_from(["/v1/prefetch", "/v1/attach", "/v1/release"]),
       body=bodies(["model_uri", "endpoint_url", "stage", "tensors", "pid", "pin_s", "background", "lease_id"]))
def test_loaderd(loaderd: FlaskClient, route: str, body: Any) -> None:
    if isinstance(body, dict) and "model_uri" in body and isinstance(body["model_uri"], str):
        body["model_uri"] = "s3://bucket/model"  # reach past the lookup now and then
    r = loaderd.post(route, data=json.dumps(body), content_type="application/json")
    check(r.status_code, r.data)


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    server = BackgroundAioServer(create_gateway_app(Gateway(ScriptedBackend(), reap_interval_s=3600), TOKEN),
                                 "127.0.0.1", 0).start()
    yield server.url
    server.close()


@FUZZ
@given(route=st.sampled_from(["/v1/functions", "/v1/completions", "/v1/chat/completions"]),
       body=bodies(["name", "model_uri", "model", "ttft_slo_s", "concurrency", "max_instances", "idle_timeout_s"]))
def test_gateway(gateway: str, route: str, body: Any) -> None:
    if route == "/v1/functions" and isinstance(body, dict) and "name" in body:
        body["name"] = f"f{uuid.uuid4().hex[:8]}" if isinstance(body["name"], str) else body["name"]
    r = requests.post(gateway + route, data=json.dumps(body), headers=AUTH | {"Content-Type": "application/json"},
                      timeout=30)
    check(r.status_code, r.content)


@pytest.fixture(scope="module")
def hosting() -> Iterator[str]:
    """A gateway hosting one function, whose settings the updates below throw bodies at."""
    from hydraserve.contracts.function import FunctionConfig

    gw = Gateway(ScriptedBackend(), reap_interval_s=3600)
    gw.register(FunctionConfig(name="fuzzed", model_uri="s3://b/m"))
    server = BackgroundAioServer(create_gateway_app(gw, TOKEN), "127.0.0.1", 0).start()
    yield server.url
    server.close()


@FUZZ
@given(body=bodies(["name", "model_uri", "ttft_slo_s", "tpot_slo_s", "concurrency", "max_instances", "idle_timeout_s",
                    "group_replicas", "min_pipeline_size", "max_pipeline_size"]))
def test_gateway_update(hosting: str, body: Any) -> None:
    r = requests.patch(hosting + "/v1/functions/fuzzed", data=json.dumps(body),
                       headers=AUTH | {"Content-Type": "application/json"}, timeout=30)
    check(r.status_code, r.content)
