"""What a request waiting for a cold start hears (activator/embedded/waiting.py), over real HTTP through
the gateway with a scripted backend whose start the test holds: a streamed request gets its
headers at once and progress comments until its first token, which the `openai` client reads
past; every answer says whether it met a cold start and how long it waited; the waits are in
/metrics; a start that fails after the headers went out ends the stream with an error event."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import requests

from hydraserve.activator.embedded.gateway import Gateway
from hydraserve.activator.embedded.waiting import COLD_START_HEADER, QUEUE_SECONDS_HEADER, TICK_S
from hydraserve.embedded.aio_server import BackgroundAioServer
from hydraserve.errors import NotFoundError
from hydraserve.testing.fake_backend import ScriptedBackend
from tests.activator.test_gateway import Instance, instance, metric, serving_fn  # noqa: F401  (fixture)

Setup = tuple[Gateway, ScriptedBackend, BackgroundAioServer]


@pytest.fixture
def held(instance: Instance) -> Iterator[Setup]:  # noqa: F811
    """A function at zero whose cold start waits until the test releases it."""
    yield from serving_fn(ScriptedBackend(url=instance.server.url, auto_release=False))


def test_a_stream_waiting_for_a_cold_start_gets_headers_at_once_and_progress_until_its_first_token(
        held: Setup) -> None:
    gw, backend, server = held
    began = time.monotonic()
    with requests.post(f"{server.url}/functions/fn/v1/completions", stream=True, timeout=30,
                       json={"prompt": "x", "stream": True, "max_tokens": 3}) as r:
        assert time.monotonic() - began < 2 and not backend.release_start.is_set(), "headers before the start ends"
        assert r.status_code == 200 and r.headers[COLD_START_HEADER] == "true"
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines = r.iter_lines()
        first = next(lines)
        assert first.startswith(b": cold start 0."), first  # at once
        planned = next(line for line in lines if b"planned" in line)  # once the backend planned (next tick)
        assert planned.startswith(b": cold start 1.") and b"planned: 1 stage(s) on fake-node" in planned
        assert b"weights 20.0/50.0 MB fetched" in planned and b"workers 0/1 ready" in planned
        backend.release_start.set()
        rest = [line for line in lines if line]
    assert any(line.startswith(b": waited ") for line in rest)
    data = [line for line in rest if line.startswith(b"data: {")]
    assert len(data) == 3 and rest[-1] == b"data: [DONE]" and time.monotonic() - began >= TICK_S
    assert metric(gw, "hydraserve_gateway_queue_wait_seconds_count", function="fn") == 1
    assert metric(gw, "hydraserve_gateway_queue_wait_seconds_sum", function="fn") >= TICK_S * 0.9
    assert metric(gw, "hydraserve_gateway_cold_start_seconds_count", function="fn") == 1
    assert metric(gw, "hydraserve_gateway_time_to_first_token_seconds_count", function="fn") == 1


def test_every_answer_says_whether_it_met_a_cold_start_and_how_long_it_waited(held: Setup) -> None:
    _gw, backend, server = held
    threading.Timer(0.5, backend.release_start.set).start()
    cold = requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}, timeout=30)
    assert cold.status_code == 200 and cold.headers[COLD_START_HEADER] == "true"
    assert float(cold.headers[QUEUE_SECONDS_HEADER]) >= 0.4
    warm = requests.post(f"{server.url}/functions/fn/v1/completions", json={"prompt": "x"}, timeout=30)
    assert warm.headers[COLD_START_HEADER] == "false" and float(warm.headers[QUEUE_SECONDS_HEADER]) < 0.4
    warm_stream = requests.post(f"{server.url}/functions/fn/v1/completions", timeout=30,
                                json={"prompt": "x", "stream": True, "max_tokens": 2})
    assert warm_stream.headers[COLD_START_HEADER] == "false"
    assert not [line for line in warm_stream.iter_lines() if line.startswith(b":")], "no progress when nothing waits"


def test_the_openai_client_reads_a_stream_through_a_cold_start(held: Setup) -> None:
    _gw, backend, server = held
    threading.Timer(TICK_S * 2.5, backend.release_start.set).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    chunks = list(client.completions.create(model="fn", prompt="x", max_tokens=4, stream=True))
    assert [c.choices[0].text for c in chunks] == ["0", "1", "2", "3"]


def test_a_start_that_fails_after_the_headers_ends_the_stream_with_an_error_event(held: Setup) -> None:
    _gw, backend, server = held
    backend.fail_next = NotFoundError("S3 object s3://b/m/tokenizer.json does not exist")
    threading.Timer(TICK_S * 1.5, backend.release_start.set).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIError, match=r"tokenizer\.json") as caught:
        list(client.completions.create(model="fn", prompt="x", max_tokens=4, stream=True))
    assert "not started again" in str(caught.value)


def test_usage_counts_tokens_of_answers_and_streams_and_a_stream_gets_only_what_it_asked_for(held: Setup) -> None:
    """Tokens from the answers' usage (a stream that did not ask for usage is asked for it, and
    the usage chunk dropped on its way back); instance-seconds and memory x seconds at each
    reaper tick; all in /metrics and fn describe."""
    gw, backend, server = held
    backend.release_start.set()
    url = f"{server.url}/functions/fn/v1/completions"
    assert requests.post(url, json={"prompt": "x"}, timeout=30).status_code == 200  # usage 3 + 1
    plain = requests.post(url, json={"prompt": "x", "stream": True, "max_tokens": 4}, timeout=30)
    events = [line for line in plain.iter_lines() if line.startswith(b"data: {")]
    assert len(events) == 4 and not any(b'"usage"' in e for e in events), "no usage chunk it did not ask for"
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    asked = list(client.completions.create(model="fn", prompt="x", max_tokens=5, stream=True,
                                           stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 5
    deadline = time.monotonic() + 5  # counted once the gateway has sent the end (the client may read it first)
    while (usage := gw.scaler("fn").status()["usage"])["requests"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (3, 9, 10)
    assert metric(gw, "hydraserve_gateway_tokens_total", function="fn", kind="completion") == 10
    assert usage["cold_starts"] == 1 and usage["cold_start_seconds"] >= 0

    async def ticks() -> None:
        await gw.reap()  # the seconds since the scaler was made
        await asyncio.sleep(0.3)
        await gw.reap()
    backend.memory_gb = 4.0
    asyncio.run_coroutine_threadsafe(ticks(), server.loop).result(10)
    usage = gw.scaler("fn").status()["usage"]
    assert usage["instance_seconds"] > 0.3 and usage["memory_gb_seconds"] == pytest.approx(4 * usage["instance_seconds"], rel=0.01)
    assert metric(gw, "hydraserve_gateway_memory_gb_seconds_total", function="fn") == pytest.approx(
        usage["memory_gb_seconds"], rel=0.01)


def test_a_stream_waiting_behind_a_busy_instance_is_not_told_of_a_cold_start(held: Setup) -> None:
    gw, backend, server = held
    backend.release_start.set()
    scaler = gw.scaler("fn")
    scaler.config = scaler.config.model_copy(update={"concurrency": 1})  # before any request: no loop work
    url = f"{server.url}/functions/fn/v1/completions"
    with requests.post(url, json={"prompt": "x", "stream": True, "max_tokens": 60}, stream=True, timeout=30) as busy:
        lines = busy.iter_lines()
        next(line for line in lines if line.startswith(b"data: {"))  # it holds the only slot
        with requests.post(url, json={"prompt": "x", "stream": True, "max_tokens": 2}, stream=True,
                           timeout=30) as waiting:
            assert waiting.headers[COLD_START_HEADER] == "false"
            waiting_lines = waiting.iter_lines()
            first = next(line for line in waiting_lines if line)
            assert first.startswith(b": waiting for a free instance (no cold start under way"), first
            list(lines)  # the busy one ends; the waiting one is served
            assert [line for line in waiting_lines if line.startswith(b"data: {")]
    assert backend.starts == 1
