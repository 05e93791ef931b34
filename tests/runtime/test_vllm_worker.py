"""A vLLM worker (runtime/serving) as a real process, adopted from a warm pool that imported vLLM:
vLLM's OpenAI server behind our front, checked with the `openai` client and the cloudevents SDK
against transformers on the same weights; strict input; our error shape; the drain on SIGTERM
leaves no process behind; a model without a tokenizer fails with the reason."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
import requests
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from hydraserve.contracts import events
from hydraserve.contracts.worker import WorkerStatus
from tests.conditions import running, wait_for

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def worker(vllm_pool: Any, tiny_llama_dir: Path) -> Iterator[Any]:
    w = vllm_pool.launch(str(tiny_llama_dir))
    w.wait_ready(120)
    yield w
    w.stop(grace_s=10)


@pytest.fixture(scope="module")
def client(worker: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=worker.url + "/v1", api_key="unused", max_retries=0)


def test_completions_are_transformers_greedy_streamed_or_not(client: openai.OpenAI, tiny_llama_greedy: Any) -> None:
    greedy, tokenizer = tiny_llama_greedy
    want = greedy(tokenizer(PROMPT)["input_ids"], 12)
    whole = client.completions.create(model="fn", prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].model_extra["token_ids"] == want  # type: ignore[index]
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="fn", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks for t in (c.choices[0].model_extra or {}).get("token_ids") or [] if c.choices]
    assert streamed == want
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_chat_uses_the_template_as_written_no_extra_bos(client: openai.OpenAI, tiny_llama_greedy: Any) -> None:
    greedy, tokenizer = tiny_llama_greedy
    messages = [{"role": "user", "content": "Tell me a story"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template's text, as written
    assert tokenizer.bos_token_id not in prompt_ids  # the template writes no BOS
    answer = client.chat.completions.create(model="fn", messages=messages,  # type: ignore[arg-type]
                                            max_completion_tokens=5, temperature=0)
    assert answer.model_extra is not None and answer.model_extra["prompt_token_ids"] == prompt_ids
    assert answer.choices[0].model_extra["token_ids"] == greedy(prompt_ids, 5)[:5]  # type: ignore[index]
    assert answer.usage is not None and answer.usage.completion_tokens <= 5
    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="fn", messages=messages, max_completion_tokens=5, temperature=0, stream=True) if c.choices]  # type: ignore[arg-type]
    assert "".join(deltas) == answer.choices[0].message.content


def test_sampling_parameters_take_effect(client: openai.OpenAI) -> None:
    base = client.completions.create(model="fn", prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert len(set(base)) < len(base), "the greedy answer repeats a token: penalties can show"
    penalized = client.completions.create(model="fn", prompt=PROMPT, max_tokens=16, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=1.0,
                                          extra_body={"ignore_eos": True}).choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert penalized != base and len(set(penalized)) > len(set(base))
    banned = base[0]
    biased = client.completions.create(model="fn", prompt=PROMPT, max_tokens=16, temperature=0,
                                       logit_bias={str(banned): -100}, extra_body={"ignore_eos": True})
    assert banned not in biased.choices[0].model_extra["token_ids"]  # type: ignore[index]
    with_logprobs = client.completions.create(model="fn", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2)
    top = with_logprobs.choices[0].logprobs
    assert top is not None and top.top_logprobs is not None and all(len(t) <= 3 for t in top.top_logprobs)
    chat = client.chat.completions.create(model="fn", messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
                                          max_completion_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(t.top_logprobs) == 2 for t in content)


def test_a_parameter_the_function_does_not_take_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="fn", messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
                                       max_completion_tokens=2, store=True)
    assert "'store'" in str(caught.value) and caught.value.body["param"] == "store"  # type: ignore[index]
    for extra in ({"typo_max_tokens": 3}, {"prompt_embeds": "AAAA"}, {"request_id": "someone-elses"}):
        with pytest.raises(openai.BadRequestError, match=next(iter(extra))):
            client.completions.create(model="fn", prompt="x", max_tokens=2, extra_body=extra)


@pytest.mark.parametrize(("body", "headers", "status", "error_type"), [
    (b'{"prompt": "x",', {"Content-Type": "application/json"}, 400, "invalid_request_error"),
    (b'{"prompt": "x", "seed": ' + b"9" * 4301 + b"}", {"Content-Type": "application/json"}, 400,
     "invalid_request_error"),
    (b'{"prompt": "x", "temperature": Infinity}', {"Content-Type": "application/json"}, 400,
     "invalid_request_error"),
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, "invalid_request_error"),
    (b'{"prompt": "x", "pad": "' + b"a" * (1 << 20) + b'"}', {"Content-Type": "application/json"}, 413,
     "invalid_request_error"),
    (b'{"prompt": "x", "model": "other"}', {"Content-Type": "application/json"}, 404, "not_found_error"),
    (b'{"prompt": "x", "max_tokens": 100000}', {"Content-Type": "application/json"}, 400, "invalid_request_error"),
])
def test_bad_requests_get_our_error_shape(worker: Any, body: bytes, headers: dict[str, str], status: int,
                                          error_type: str) -> None:
    r = requests.post(worker.url + "/v1/completions", data=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == error_type and error["retryable"] is False and error["message"]


def test_only_the_functions_routes_are_open(worker: Any) -> None:
    for method, path in (("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/v1/responses"),
                         ("GET", "/version"), ("POST", "/v1/messages"), ("POST", "/inference/v1/generate")):
        r = requests.request(method, worker.url + path, json={}, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path
    assert requests.get(worker.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "fn"
    tokens = requests.post(worker.url + "/tokenize", json={"prompt": "hi"}, timeout=10).json()["tokens"]
    assert requests.post(worker.url + "/detokenize", json={"tokens": tokens}, timeout=10).json()["prompt"].endswith("hi")


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_cloudevents_with_the_sdk(worker: Any, tiny_llama_greedy: Any, mode: str) -> None:
    greedy, tokenizer = tiny_llama_greedy
    event = CloudEvent(attributes={"type": events.COMPLETION_REQUEST, "source": "/tests", "id": "e-1",
                                   "datacontenttype": "application/json"},
                       data={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "stream": True})
    fmt = JSONFormat()
    message = ce_http.to_binary(event, fmt) if mode == "binary" else ce_http.to_structured(event, fmt)
    r = requests.post(worker.url + "/", data=message.body, headers=dict(message.headers), timeout=30)
    assert r.status_code == 200, r.text
    answer = ce_http.from_http(ce_http.HTTPMessage(headers=dict(r.headers), body=r.content), fmt)
    assert answer.get_type() == events.COMPLETION_RESPONSE and answer.get_subject() == "e-1"
    assert answer.get_data()["choices"][0]["token_ids"] == greedy(tokenizer(PROMPT)["input_ids"], 6)  # type: ignore[index]
    bad = CloudEvent(attributes={"type": events.CHAT_REQUEST, "source": "/tests", "id": "e-2",
                                 "datacontenttype": "application/json"}, data={"messages": [], "bogus": 1})
    message = ce_http.to_binary(bad, fmt)
    r = requests.post(worker.url + "/", data=message.body, headers=dict(message.headers), timeout=30)
    assert r.status_code == 400
    error = ce_http.from_http(ce_http.HTTPMessage(headers=dict(r.headers), body=r.content), fmt)
    assert error.get_type() == events.ERROR and "bogus" in error.get_data()["error"]["message"]  # type: ignore[index]


def test_a_vanishing_temperature_harms_no_request_batched_with_it_on_vllm(worker: Any, client: openai.OpenAI) -> None:
    """Issue 22 item 1 with vLLM's engine serving (the compact engine's own test is in
    test_engine.py): temperatures of 1e-38 and 5e-324, batched with ordinary ones, made the
    probabilities NaN and failed the whole batch. vLLM raises a temperature under 0.01 to 0.01
    (its _MAX_TEMP; the compact engine behind vLLM's front half gets the raised one too): every
    request of the batch is answered in full."""
    events = requests.get(worker.url + "/v1/hydraserve/timeline", timeout=5).json()["events"]
    assert [e["detail"].get("first_token_engine") for e in events if e["name"] == "engine_ready"] == ["vllm"]
    temperatures = [1e-38, 0.8, 5e-324, 1.0, 1e-38, 0.5, 0.0, 1e-38]
    with ThreadPoolExecutor(len(temperatures)) as pool:
        answers = list(pool.map(lambda t: client.completions.create(
            model="fn", prompt=PROMPT, max_tokens=8, temperature=t, extra_body={"ignore_eos": True}), temperatures))
    assert [a.usage.completion_tokens if a.usage else None for a in answers] == [8] * len(temperatures)
    assert all(len(a.choices[0].model_extra["token_ids"]) == 8 for a in answers)  # type: ignore[index]


def test_status_and_timeline(worker: Any) -> None:
    status = WorkerStatus.model_validate(requests.get(worker.url + "/readyz", timeout=5).json())
    assert status.status == "ready" and status.function == "fn"
    names = [e["name"] for e in requests.get(worker.url + "/v1/hydraserve/timeline", timeout=5).json()["events"]]
    for phase in ("process_started", "http_listening", "libraries_imported", "config_loaded", "engine_configured",
                  "weights_attached", "first_tensor_loaded", "weights_loaded", "engine_started", "warmed_up",
                  "engine_ready"):
        assert phase in names
    metrics = requests.get(worker.url + "/metrics", timeout=5).text
    assert "hydraserve_runtime_requests_total" in metrics and "vllm:" in metrics


def test_sigterm_drains_the_stream_in_flight_and_leaves_no_process(vllm_pool: Any, tiny_llama_dir: Path) -> None:
    """Nor a temporary file: vLLM's file rendezvous (/tmp/vllm_dist_*, one per engine) was left
    in /tmp by every worker until they went to the worker's run dir."""
    rendezvous_before = set(Path("/tmp").glob("vllm_dist_*"))
    w = vllm_pool.launch(str(tiny_llama_dir))
    w.wait_ready(120)
    family = [w.proc.pid, *(c.pid for c in psutil.Process(w.proc.pid).children(recursive=True))]
    sockets = {c.laddr for pid in family for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr}
    assert sockets and all(Path(s).parent.name.startswith("hydraserve-worker-") for s in sockets), sockets
    assert len(family) >= 3  # the worker, vLLM's engine core, its model worker
    lines: list[str] = []

    def stream() -> None:
        with requests.post(w.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 200, "stream": True,
                                                            "ignore_eos": True}, stream=True, timeout=60) as r:
            lines.extend(line.decode() for line in r.iter_lines() if line)

    def draining() -> bool:
        try:
            return requests.get(w.url + "/readyz", timeout=1).status_code == 503
        except requests.ConnectionError:
            return True

    reader = threading.Thread(target=stream)
    reader.start()
    assert wait_for(lambda: lines, 30)  # the stream is under way
    w.proc.send_signal(signal.SIGTERM)
    assert wait_for(draining, 5)
    reader.join(60)
    assert lines and lines[-1] == "data: [DONE]"  # the stream in flight finished
    assert w.proc.wait(30) == 0
    assert wait_for(lambda: not running(family), 5), running(family)
    assert not [s for s in sockets if Path(s).exists()]  # vLLM's IPC sockets went with the worker's run dir
    assert set(Path("/tmp").glob("vllm_dist_*")) == rendezvous_before


def test_a_worker_killed_with_all_its_processes_leaves_nothing_once_stopped(vllm_pool: Any,
                                                                           tiny_llama_dir: Path) -> None:
    """SIGKILL to the worker's whole process group (vLLM's engine and Python's resource tracker
    too: nobody left to clean up) leaves vLLM's shared-memory queues and the worker's run dir; the
    launcher's stop removes what the worker wrote down. Before, each killed worker left ~190 MB
    in /dev/shm for good."""
    import os

    w = vllm_pool.launch(str(tiny_llama_dir))
    w.wait_ready(120)
    written = w.leftovers.read_text().splitlines()
    segments = [Path("/dev/shm") / line.split(" ", 1)[1] for line in written if line.startswith("shm ")]
    run_dirs = [Path(line.split(" ", 1)[1]) for line in written if line.startswith("dir ")]
    assert segments and all(s.exists() for s in segments) and len(run_dirs) == 1 and run_dirs[0].is_dir(), written
    family = [w.proc.pid, *(c.pid for c in psutil.Process(w.proc.pid).children(recursive=True))]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    w.proc.wait(10)
    assert wait_for(lambda: not running(family), 5), running(family)
    assert [s for s in segments if s.exists()], "nothing removed them: the launcher must"
    w.stop(grace_s=1)
    assert not [s for s in segments if s.exists()] and not run_dirs[0].exists() and not w.leftovers.exists()


def test_a_model_without_a_tokenizer_fails_saying_so(vllm_pool: Any, tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama_dir, model)
    (model / "tokenizer.json").unlink()
    w = vllm_pool.launch(str(model))
    try:
        with pytest.raises(Exception, match="has no tokenizer"):
            w.wait_ready(120)
    finally:
        w.stop(grace_s=5)


def test_a_context_longer_than_the_kv_cache_holds_is_fitted_to_it(vllm_pool: Any, tiny_llama_dir: Path,
                                                                  tmp_path: Path) -> None:
    """A model whose context (here 1M tokens) needs more KV cache than its memory grant (8 MiB):
    the worker serves the longest context the cache holds (vLLM's auto-fit) instead of failing."""
    model = tmp_path / "long-context"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 1 << 20}))
    w = vllm_pool.launch(str(model), kv_cache_bytes=8 << 20)
    try:
        w.wait_ready(120)
        served = requests.get(w.url + "/v1/models", timeout=10).json()["data"][0]["max_model_len"]
        assert 0 < served < 1 << 20
        r = requests.post(w.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        w.stop(grace_s=5)


def test_no_body_gives_a_500(worker: Any) -> None:
    """hypothesis throws JSON at the vLLM worker's body-taking routes: every answer is a success
    or a 4xx in our error shape (the compact engine's apps: tests/test_fuzz_bodies.py)."""
    from hypothesis import HealthCheck, given, settings

    from tests.test_fuzz_bodies import bodies

    keys = {"/v1/completions": ["model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                "n", "logprobs", "logit_bias", "stream", "frequency_penalty", "min_tokens"],
            "/v1/chat/completions": ["model", "messages", "max_completion_tokens", "temperature", "logprobs",
                                     "top_logprobs", "response_format", "tools", "tool_choice", "stream"]}

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=bodies(keys["/v1/completions"]) | bodies(keys["/v1/chat/completions"]))
    def fuzz(data: Any) -> None:
        for path in keys:
            r = requests.post(worker.url + path, data=json.dumps(data), timeout=60,  # Infinity too: a 400
                              headers={"Content-Type": "application/json"})
            assert r.status_code < 500, (path, data, r.text[:300])
            if r.status_code >= 400:
                error = r.json()["error"]
                assert {"message", "type", "param", "code", "retryable"} <= error.keys()

    fuzz()


def test_a_connection_kept_alive_across_the_engine_fork_is_closed_by_the_worker(vllm_pool: Any,
                                                                                tiny_llama_dir: Path) -> None:
    """A client holds a kept-alive connection while the worker forks vLLM's engine: when the
    worker closes it (uvicorn's 5 s keep-alive), the client sees the close. Before the fix, the
    engine's processes held copies of the socket, no FIN was sent, and the next request on it
    (the gateway's) waited for an answer no one would write. Spawned, not adopted: its import of
    vLLM makes sure the connection is made before the fork."""
    import socket

    w = vllm_pool.launch(str(tiny_llama_dir), pooled=False)
    try:
        port = int(w.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        while True:
            try:
                held = socket.create_connection(("127.0.0.1", port), timeout=20)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        connected_at = time.time()
        held.sendall(b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n")
        answer = http.client.HTTPResponse(held)  # reads exactly one answer, the connection stays open
        answer.begin()
        assert answer.status == 200 and answer.read()
        w.wait_ready(120)
        engine = psutil.Process(w.proc.pid).children()
        assert engine and min(p.create_time() for p in engine) > connected_at, "forked before the connection"
        assert held.recv(4096) == b""  # the worker's close reached us (within uvicorn's 5 s keep-alive)
        held.close()
    finally:
        w.stop(grace_s=5)
