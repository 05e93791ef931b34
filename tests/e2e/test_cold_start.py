"""End to end on the embedded stack: real moto S3, loaderd and placement processes, worker
processes spawned per cold start, the gateway over HTTP. The reference for the generated
tokens is Hugging Face transformers' greedy generate() on the same weights."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from hydraserve.contracts import events
from hydraserve.contracts.backend import Endpoint
from hydraserve.contracts.function import FunctionConfig
from hydraserve.embedded.demo_client import stream_completion
from hydraserve.embedded.stack import LocalStack, StackOptions
from tests.conditions import running, wait_for

PROMPT = "Once upon a time"
COLD_START_EVENTS = ["request_received", "plan_decided", "prefetch_started", "worker_spawned",
                     "process_started", "http_listening", "libraries_imported", "weights_attached",
                     "weights_loaded", "engine_ready", "instance_ready", "first_response_byte"]


@pytest.fixture(scope="module")
def stack(tiny_llama_dir: Path) -> Iterator[LocalStack]:
    # keep_alive fixed: the tests here wait for zero after 2 s idle, whatever the module's requests
    # taught the function's histogram (its policy has tests of its own)
    options = StackOptions(nodes=2, model_dir=tiny_llama_dir, idle_timeout_s=2.0, progress=False,
                           reconcile_interval_s=1.0, function={"keep_alive": "fixed"}, worker={"dtype": "float32"})
    with LocalStack(options) as s:
        yield s
    assert s.leftovers == [], "shared memory segments left behind"


def free_gb(stack: LocalStack) -> dict[str, float]:
    """Each node's free memory as the placement service sees it."""
    return {n.name: sum(n.gpu_free_gb) for n in stack.placement.cluster().nodes}


def transformers_greedy(model_dir: Path, prompt: str, n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    from hydraserve.runtime.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(str(model_dir)).encode(prompt)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_cold_start_through_gateway_matches_transformers(stack: LocalStack, tiny_llama_dir: Path) -> None:
    assert stack.gateway is not None
    assert stack.gateway.scaler("tiny-llama").state.value == "zero"
    result = stream_completion(stack.function_url() + "/v1/completions",
                               {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    assert result.status == 200, result.error
    expected = transformers_greedy(tiny_llama_dir, PROMPT, 12)
    assert result.token_ids and result.token_ids == expected[:len(result.token_ids)]
    assert len(result.token_ids) == 12 or result.finish_reason == "stop"

    timeline = stack.gateway.cold_start_timeline("tiny-llama")
    names = [e.name for e in sorted(timeline.events, key=lambda e: e.at)]
    assert [n for n in names if n in COLD_START_EVENTS] == COLD_START_EVENTS
    attached = timeline.first("weights_attached")
    assert attached is not None and attached.detail.get("via") != "s3", "should load through loaderd"


def test_cloudevent_through_gateway(stack: LocalStack) -> None:
    event = CloudEvent(attributes={"type": events.COMPLETION_REQUEST, "source": "/e2e", "id": "e-1",
                                   "datacontenttype": "application/json"},
                       data={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    message = ce_http.to_binary(event, JSONFormat())
    r = requests.post(stack.function_url() + "/", data=message.body, headers=message.headers, timeout=120)
    assert r.status_code == 200
    reply = ce_http.from_http(ce_http.HTTPMessage(headers=dict(r.headers), body=r.content), JSONFormat())
    assert reply.get_type() == events.COMPLETION_RESPONSE and reply.get_subject() == "e-1"


def test_unknown_function_is_404(stack: LocalStack) -> None:
    r = requests.post(stack.gateway_url + "/functions/nope/v1/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_idle_function_scales_to_zero_and_cold_starts_from_cache(stack: LocalStack) -> None:
    assert stack.gateway is not None
    scaler = stack.gateway.scaler("tiny-llama")
    stream_completion(stack.function_url() + "/v1/completions", {"prompt": "x", "max_tokens": 2})
    deadline = time.monotonic() + 30
    while scaler.state.value != "zero" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scaler.state.value == "zero", "function did not scale to zero after its idle timeout"
    before = scaler.cold_starts
    result = stream_completion(stack.function_url() + "/v1/completions",
                               {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    assert result.status == 200 and scaler.cold_starts == before + 1
    prefetch = stack.gateway.cold_start_timeline("tiny-llama").first("prefetch_started")
    assert prefetch is not None
    # The placement service prefers the node whose loaderd still holds the model: nothing new
    # to download.
    assert prefetch.detail["bytes_new"] == 0, prefetch.detail


def test_a_prewarm_fetches_a_functions_weights_into_a_loaderd_before_its_first_cold_start(
        stack: LocalStack, tiny_llama_dir: Path) -> None:
    """What the keep-alive policy asks before a likely arrival: the weights land in the loaderd
    of the node the next cold start would use, pinned; asked again they are already there, and
    the cold start (after placement learned the residency) fetches nothing new."""
    from hydraserve.embedded.demo_model import push_directory

    assert stack.gateway is not None and stack.backend is not None
    uri = push_directory(stack.s3, tiny_llama_dir, "prewarmed", progress=False)
    function = FunctionConfig(name="prewarmed", model_uri=uri, keep_alive="fixed")
    stack.gateway.register(function)
    from hydraserve.provider.residency import reconcile_node

    assert stack.supervisor is not None
    daemons = stack.supervisor.daemons.values()
    fetched = stack.backend.prewarm(function, 60.0)
    assert fetched > 0
    holders = [d.info.name for d in daemons if any(m.model_uri == uri for m in d.process.client().status().models)]
    assert len(holders) == 1, "one node (the planner's choice for p = 1) holds the model"
    assert stack.backend.prewarm(function, 60.0) == 0  # already resident
    for daemon in daemons:  # what the supervisor does every reconcile interval
        reconcile_node(stack.placement, daemon.info, daemon.process.client())
    result = stream_completion(stack.function_url("prewarmed") + "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert result.status == 200
    prefetch = stack.gateway.cold_start_timeline("prewarmed").first("prefetch_started")
    assert prefetch is not None and prefetch.detail["bytes_new"] == 0 and prefetch.detail["node"] == holders[0]


def worker_metric(url: str, name: str) -> float:
    """The sum of a metric's samples (every label set) as the worker exports it."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in requests.get(f"{url}/metrics", timeout=5).text.splitlines()
               if line.startswith((name + " ", name + "{")))


def test_clients_that_leave_stop_their_generation_in_the_engine(stack: LocalStack) -> None:
    """Through the gateway to a real worker: a stream the client closes after 3 tokens, and a
    non-streamed request whose client times out, each stop long before their max_tokens. A
    function of its own, kept through pauses the test's direct reads of the worker make (the
    module's function scales to zero after 2 s idle)."""
    assert stack.gateway is not None and stack.backend is not None
    lingering = FunctionConfig(name="lingering", model_uri=stack.model_uri, keep_alive="fixed", idle_timeout_s=120.0)
    stack.backend.prepare(lingering)
    stack.gateway.register(lingering)
    url = stack.function_url("lingering") + "/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with requests.post(url, json=body | {"stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200
        data = (line for line in r.iter_lines() if line.startswith(b"data:"))
        for _ in range(3):
            next(data)
    (worker,) = stack.gateway.scaler("lingering").endpoints
    tokens = "vllm:generation_tokens_total"
    deadline = time.monotonic() + 10
    while worker_metric(worker.url, "hydraserve_runtime_client_gone_total") < 1:
        assert time.monotonic() < deadline, "the worker never saw the client leave"
        time.sleep(0.05)
    generated = worker_metric(worker.url, tokens)
    time.sleep(0.5)
    assert worker_metric(worker.url, tokens) == generated, "tokens still generated for nobody"
    assert worker_metric(worker.url, "hydraserve_runtime_inflight_requests") == 0
    longest = requests.get(f"{worker.url}/v1/models", timeout=5).json()["data"][0]["max_model_len"] - 16
    started = time.monotonic()  # how fast this machine generates: the client must leave well before the end
    requests.post(url, json=body | {"max_tokens": 32}, timeout=60).raise_for_status()
    leave_after_s = min(0.3, max(0.02, (time.monotonic() - started) / 32 * longest / 4))
    generated = worker_metric(worker.url, tokens)
    with pytest.raises(requests.Timeout):
        requests.post(url, json=body | {"max_tokens": longest}, timeout=(5, leave_after_s))
    deadline = time.monotonic() + 10
    while worker_metric(worker.url, "hydraserve_runtime_client_gone_total") < 2:
        assert time.monotonic() < deadline, "the non-streamed request ran on for a client that left"
        time.sleep(0.05)
    assert worker_metric(worker.url, tokens) - generated < longest
    assert worker_metric(worker.url, "hydraserve_runtime_inflight_requests") == 0


def test_a_loaderd_killed_is_started_again_and_its_models_stop_counting_as_cache(stack: LocalStack) -> None:
    """SIGKILL the daemon that holds the model: up starts it again on the same address, its dead
    predecessor's segments are removed, placement stops counting the model as cached there,
    and the next cold start fetches it again and answers."""
    assert stack.gateway is not None and stack.supervisor is not None
    scaler = stack.gateway.scaler("tiny-llama")
    assert stream_completion(stack.function_url() + "/v1/completions", {"prompt": "x", "max_tokens": 2}).status == 200
    holders = {n.name for n in stack.placement.cluster().nodes if stack.model_uri in n.resident_models}
    assert holders, "the cold start's node holds the model"
    victim = stack.supervisor.daemons[sorted(holders)[0]]
    old_pid = victim.process.proc.pid
    segments = [p for p in stack.leftover_segments() if f"-{victim.info.name}-" in p]
    assert segments
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim.restarts == 0 or not victim.process.client().healthy():
        assert time.monotonic() < deadline, "loaderd was not started again"
        time.sleep(0.1)
    assert victim.process.proc.pid != old_pid and victim.process.url == victim.info.loaderd_url
    assert not [p for p in segments if os.path.exists(p)], "the dead daemon's segments are still there"
    while stack.model_uri in next(n for n in stack.placement.cluster().nodes if n.name == victim.info.name).resident_models:
        assert time.monotonic() < deadline, "placement still counts the dead daemon's model as cache"
        time.sleep(0.1)
    while scaler.state.value != "zero":  # idle: scales to zero, then a fresh cold start
        assert time.monotonic() < deadline
        time.sleep(0.1)
    result = stream_completion(stack.function_url() + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
    assert result.status == 200


def test_a_warm_pool_killed_is_started_again_and_cold_starts_adopt_from_it(stack: LocalStack) -> None:
    """SIGKILL every node's fork server (issue 22 item 8: a killed one was never restarted and
    every later cold start spawned): each is started again on its socket, its idle children are
    gone, and the next cold start adopts a pooled process."""
    from hydraserve.runtime.embedded.forkserver_client import serving_status

    assert stack.gateway is not None and stack.supervisor is not None and stack.supervisor.pools
    scaler = stack.gateway.scaler("tiny-llama")
    deadline = time.monotonic() + 120
    while scaler.state.value != "zero":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    pools = list(stack.supervisor.pools.values())
    clients = stack.backend.launcher.pools  # type: ignore[union-attr]
    idle = [int(pid) for pool in pools for pid in clients[pool.node].status()["idle"]]  # type: ignore[union-attr]
    for pool in pools:
        os.kill(pool.process.proc.pid, signal.SIGKILL)
    while not all(pool.restarts and serving_status(clients[pool.node]) for pool in pools):
        assert time.monotonic() < deadline, "a warm pool was not started again"
        time.sleep(0.2)
    # each read EOF on its socket pair when its server died
    assert wait_for(lambda: not running(idle), deadline - time.monotonic()), f"idle children live on: {running(idle)}"
    assert stream_completion(stack.function_url() + "/v1/completions", {"prompt": "x", "max_tokens": 2}).status == 200
    spawned = stack.gateway.cold_start_timeline("tiny-llama").first("worker_spawned")
    assert spawned is not None and spawned.detail.get("adopted") is True


def test_the_stacks_s3_takes_its_own_keys_only(stack: LocalStack) -> None:
    """Issue 22 item 6: the embedded S3 took any credentials (list, put, delete with a wrong key;
    unsigned requests too). Now it checks signatures against the keys it made at start."""
    import requests as http

    from hydraserve.errors import StorageError
    from hydraserve.weights.s3 import S3Client, S3Credentials
    from hydraserve.weights.s3_uri import parse_s3_uri

    uri = parse_s3_uri(stack.model_uri)
    bucket, prefix = uri.bucket, uri.key
    good = stack.s3.credentials
    wrong = S3Client(stack.s3.endpoint_url, credentials=S3Credentials(good.access_key_id, "not-the-secret-0"))
    for act in (lambda: wrong.list_prefix(bucket, prefix), lambda: wrong.put_bytes(bucket, "x", b"x")):
        with pytest.raises(StorageError, match="rejected the credentials"):
            act()
    for method in ("GET", "PUT", "DELETE"):  # unsigned
        answer = http.request(method, f"{stack.s3.endpoint_url}/{bucket}/{prefix}/config.json", data=b"x", timeout=10)
        assert answer.status_code == 403, (method, answer.status_code)
    listed = http.get(f"{stack.s3.endpoint_url}/{bucket}?list-type=2", timeout=10)  # moto refuses it with a 500
    assert listed.status_code != 200 and "ListBucketResult" not in listed.text
    assert stack.s3.client().list_prefix(bucket, prefix)  # the stack's own keys still work


def test_the_embedded_s3_killed_is_started_again_with_its_keys_and_every_object(stack: LocalStack) -> None:
    """Issue 22 item 6: the stack's S3 dying was permanent. Killed (not asked to stop), it is
    started again on its port with the same keys, holding what any client had pushed (written
    through to disk as it was put), and a function on a model pushed before the kill cold-starts."""
    from hydraserve.weights.push import push_model

    assert stack.gateway is not None and stack.supervisor is not None
    uri = f"{stack.model_uri}-outlives-s3"
    push_model(stack.run_dir / "model" if stack.options.model_dir is None else stack.options.model_dir, uri,
               progress=False, client=stack.s3.client())  # by a client: only the write-through keeps it
    before, pid = stack.supervisor.s3_restarts, stack.s3.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (stack.supervisor.s3_restarts > before and stack.s3.running):
        assert time.monotonic() < deadline, "the S3 was not started again"
        time.sleep(0.1)
    assert stack.s3.pid != pid
    keys = {o.key.rsplit("/", 1)[-1] for o in stack.s3.client().list_prefix("models", uri.split("/", 3)[3] + "/")}
    assert {"config.json", "model.safetensors", "hydraserve-manifest.json"} <= keys  # same keys accepted too
    stack.gateway.register(FunctionConfig(name="outlives-s3", model_uri=uri))
    r = requests.post(stack.gateway_url + "/functions/outlives-s3/v1/completions", json={"prompt": "x", "max_tokens": 2},
                      timeout=120)
    assert r.status_code == 200, r.text


def test_a_frozen_worker_is_failed_over_and_its_request_answered_by_another(stack: LocalStack) -> None:
    """Issue 22 item 8: a worker frozen (SIGSTOP) for 50 s stalled its requests 50 s, no failover.
    Stopped by a signal for 3 s it counts as lost: its instance fails (the frozen process killed)
    and the request waiting on it is sent to a fresh instance."""
    from hydraserve.provider.embedded.process import FROZEN_AFTER_S

    assert stack.gateway is not None and stack.backend is not None
    url = stack.function_url() + "/v1/completions"
    assert requests.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=120).status_code == 200
    scaler = stack.gateway.scaler(stack.options.function_name)
    (instance,) = scaler.instances.values()
    group = stack.backend.group(instance.instance_id)
    assert group is not None
    frozen = group.head.proc
    failures = scaler.instance_failures
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = requests.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen.pid, signal.SIGCONT)
    assert r.status_code == 200, r.text
    assert scaler.instance_failures == failures + 1 and instance.instance_id not in scaler.instances
    assert frozen.poll() is not None, "the frozen worker was stopped"
    print(f"frozen worker failed over: its request answered in {elapsed:.1f} s")
    assert FROZEN_AFTER_S <= elapsed < 45, elapsed  # noticed, failed over, a fresh cold start (not 50 s+ of waiting)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo.extend(children.get(p, []))
    return found


def _listening() -> dict[int, str]:
    """inode -> local address of every listening TCP socket in this network namespace."""
    from hydraserve.loaderd.peer import proc_address

    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    ip, port = proc_address(fields[1])
                    out[int(fields[9])] = f"{ip}:{port}"
    return out


def test_nothing_the_stack_runs_listens_beyond_loopback(stack: LocalStack) -> None:
    """Every socket the gateway, placement, S3, loaderds and workers listen on is on loopback
    (the stack was started without --host)."""
    assert stream_completion(stack.function_url() + "/v1/completions", {"prompt": "x", "max_tokens": 2}).status == 200
    listening = _listening()
    ours: dict[int, str] = {}
    for pid in _descendants(os.getpid()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in listening:
                    ours[inode] = listening[inode]
    assert len(ours) >= 5  # gateway, placement, S3, two loaderds (and the worker)
    assert all(addr.startswith("127.") for addr in ours.values()), ours


def test_a_function_whose_model_is_missing_fails_until_the_model_is_pushed(stack: LocalStack) -> None:
    """A cold start that cannot succeed (no model at the URI) marks the function failed: answered
    at once with the reason (424, not retryable) and not started again, until a push changes the
    model; then the next request cold-starts it."""
    from hydraserve.weights.push import push_model

    assert stack.gateway is not None
    uri = f"{stack.model_uri}-pushed-later"
    stack.gateway.register(FunctionConfig(name="broken", model_uri=uri))
    url = stack.gateway_url + "/functions/broken/v1/completions"
    for _ in range(2):
        r = requests.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=120)
        assert r.status_code == 424, r.text
        error = r.json()["error"]
        assert "pushed-later" in error["message"] and error["retryable"] is False and error["type"] == "function_failed"
    status = stack.gateway.scaler("broken").status()
    assert status["state"] == "failed" and status["cold_starts"] == 0 and status["failed"] is not None
    push_model(stack.run_dir / "model" if stack.options.model_dir is None else stack.options.model_dir, uri,
               progress=False, client=stack.s3.client())
    deadline = time.monotonic() + 60
    while (r := requests.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=120)).status_code == 424:
        assert time.monotonic() < deadline, "the pushed model was never noticed"
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 2
    assert stack.gateway.scaler("broken").status()["state"] == "ready"


def test_cold_start_against_an_unreachable_s3_fails_within_the_retry_budget(stack: LocalStack) -> None:
    """S3 down when a cold start needs it: the one retry budget (15 s by default) bounds it, and
    the 503 names the endpoint; the function stays at zero and nothing is left behind."""
    from hydraserve.weights.push import push_model

    assert stack.gateway is not None
    uri = f"{stack.model_uri}-unreachable"  # a copy no loaderd holds yet
    push_model(stack.run_dir / "model" if stack.options.model_dir is None else stack.options.model_dir, uri,
               progress=False, client=stack.s3.client())
    function = FunctionConfig(name="unreachable", model_uri=uri)
    stack.backend.prepare(function)  # described at deploy time, while S3 is up
    stack.gateway.register(function)
    stack.s3.snapshot()  # the restarted server must hold what the other tests pushed
    stack.s3.kill()
    try:
        started = time.monotonic()
        r = requests.post(stack.gateway_url + "/functions/unreachable/v1/completions",
                          json={"prompt": "x", "max_tokens": 2}, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        stack.s3.start()
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert stack.s3.endpoint_url in message and "failed" in message, message
    assert 10.0 < elapsed < 15.0 + 5.0, elapsed  # retried for the budget, then gave up (plus the cold start's own steps)
    assert stack.gateway.scaler("unreachable").status()["state"] == "zero"


def test_closing_the_backend_mid_cold_start_stops_its_workers(tiny_llama_dir: Path) -> None:
    """The backend closing (up's Ctrl-C) while a cold start is under way stops that start's
    workers at once, and the start, when it returns, fails instead of handing out an instance
    nobody would ever stop (before: its worker outlived a start slower than the gateway's wait)."""
    import threading

    from hydraserve.contracts.timeline import Timeline

    options = StackOptions(nodes=1, model_dir=tiny_llama_dir, progress=False)
    with LocalStack(options) as stack:
        assert stack.backend is not None and stack.gateway is not None
        backend, function = stack.backend, stack.gateway.scaler("tiny-llama").config
        outcome: list[object] = []

        def start() -> None:
            try:
                outcome.append(backend.start(function, Timeline()))
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not backend.launcher.running():
            assert time.monotonic() < deadline, "no worker was spawned"
            time.sleep(0.01)
        workers = backend.launcher.running()
        backend.close()
        assert all(w.proc.poll() is not None for w in workers), "a worker of the start under way kept running"
        thread.join(60)
        assert len(outcome) == 1 and isinstance(outcome[0], Exception), outcome
        assert backend.launcher.running() == []
    assert stack.leftovers == []


def test_a_pipeline_group_cold_starts_serves_consolidates_and_scales_to_zero(group_llama_dir: Path) -> None:
    """Nodes declared with slow NICs (50 Mbit/s) make the planner split the model over both:
    each node's loaderd prefetches its stage, a head and an inner stage start, link, and serve
    transformers' tokens through the gateway; the head (given memory for the whole model)
    then loads the rest through its loaderd and takes over, the inner stage's worker is stopped
    and its memory freed; at zero the head stops too and nothing is left."""
    model_dir = group_llama_dir
    options = StackOptions(nodes=2, model_dir=model_dir, node_nic_gbps=0.05, ttft_slo_s=3.0, idle_timeout_s=15.0,
                           progress=False, function_name="grouped")
    with LocalStack(options) as stack:
        assert stack.gateway is not None
        at_zero = free_gb(stack)  # each node's memory less its warm pool's
        result = stream_completion(stack.function_url() + "/v1/completions",
                                   {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert result.status == 200, result.error
        assert result.token_ids == transformers_greedy(model_dir, PROMPT, 8)[:len(result.token_ids)]
        timeline = stack.gateway.cold_start_timeline("grouped")
        plan = timeline.first("plan_decided")
        assert plan is not None and plan.detail["pipeline_size"] == 2 and len(set(plan.detail["nodes"])) == 2
        assert len([e for e in timeline.events if e.name == "prefetch_started"]) == 2
        assert len([e for e in timeline.events if e.name == "worker_spawned"]) == 2
        assert timeline.first("group_linked") is not None
        (group,) = stack.backend._groups.values()  # type: ignore[attr-defined]
        assert group.consolidated.wait(60), "the head did not consolidate"
        assert len(group.workers) == 1
        node = group.plan.stages[1].node
        assert free_gb(stack)[node] == pytest.approx(at_zero[node])  # the inner stage's memory is back
        assert at_zero[node] < options.node_gpu_memory_gb  # less the warm pool's
        again = stream_completion(stack.function_url() + "/v1/completions",
                                  {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert again.status == 200 and again.token_ids == result.token_ids  # the whole model answers the same
        merged = stack.backend.worker_timeline(Endpoint(url=group.head.url, instance_id=group.plan.instance_id))
        head_events = [e.name for e in merged.events if e.component == "worker"]
        assert head_events.index("consolidation_fetch_started") < head_events.index("consolidated")
        inner_events = [e.name for e in merged.events if e.component == "stage1"]  # kept after it stopped
        assert {"weights_attached", "weights_loaded", "stage_joined", "engine_ready"} <= set(inner_events)
        assert "tokenizer" not in " ".join(inner_events)
        scaler = stack.gateway.scaler("grouped")
        deadline = time.monotonic() + 30
        while scaler.state.value != "zero" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scaler.state.value == "zero"
        assert stack.placement.cluster().active_plans == 0
    assert stack.leftovers == []


def test_a_group_with_two_full_workers_becomes_two_replicas_behind_the_gateway(group_llama_dir: Path) -> None:
    """Asked for 2 replicas per group, the planner gives both stages memory for the whole model:
    after the first request the head consolidates and the inner stage, which grew into the whole
    model meanwhile through its own loaderd, serves on its own; the gateway routes to both, each
    answers transformers' tokens, and at zero both stop and every byte of memory is back."""
    model_dir = group_llama_dir
    options = StackOptions(nodes=2, model_dir=model_dir, node_nic_gbps=0.05, ttft_slo_s=3.0, idle_timeout_s=20.0,
                           progress=False, function_name="replicated", function={"group_replicas": 2})
    with LocalStack(options) as stack:
        assert stack.gateway is not None and stack.backend is not None
        at_zero = free_gb(stack)
        body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        first = stream_completion(stack.function_url() + "/v1/completions", body)
        assert first.status == 200, first.error
        assert first.token_ids == transformers_greedy(model_dir, PROMPT, 8)[:len(first.token_ids)]
        plan = stack.gateway.cold_start_timeline("replicated").first("plan_decided")
        assert plan is not None and plan.detail["pipeline_size"] == 2
        scaler = stack.gateway.scaler("replicated")
        deadline = time.monotonic() + 90
        while len(scaler.instances) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(scaler.instances) == 2, scaler.status()
        head_id, replica_id = list(scaler.instances)
        assert replica_id == f"{head_id}-s1" and scaler.status()["replicas"] == 1
        replica = stack.backend.group(replica_id)
        assert replica is not None and replica.stages[0].stage.index == 1
        direct = stream_completion(scaler.instances[replica_id].endpoint.url + "/v1/completions", body)
        assert direct.status == 200 and direct.token_ids == first.token_ids  # the former stage 1, alone
        events = [e.name for e in stack.backend.worker_timeline(scaler.instances[replica_id].endpoint).events]
        assert events.index("consolidation_fetch_started") < events.index("replica_built") < events.index(
            "replica_serving")
        assert all(free_gb(stack)[n] < at_zero[n] for n in at_zero)  # each holds the whole model
        # a replica killed is that instance's failure alone: the head serves on
        os.kill(replica.head.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while replica_id in scaler.instances and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(scaler.instances) == [head_id] and scaler.status()["instance_failures"] == 1
        again = stream_completion(stack.function_url() + "/v1/completions", body)
        assert again.status == 200 and again.token_ids == first.token_ids
        node = replica.stages[0].node
        deadline = time.monotonic() + 10
        while free_gb(stack)[node] < at_zero[node] - 1e-6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert free_gb(stack)[node] == pytest.approx(at_zero[node])  # the replica's memory is back
        assert stack.placement.cluster().active_plans == 1  # the head's part of the plan remains
        deadline = time.monotonic() + 60
        while scaler.state.value != "zero" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scaler.state.value == "zero"
        assert stack.placement.cluster().active_plans == 0
        assert free_gb(stack) == pytest.approx(at_zero)
    assert stack.leftovers == []


def test_a_model_vllm_cannot_serve_is_refused_at_creation_saying_what_to_fix(stack: LocalStack,
                                                                             tiny_llama_dir: Path,
                                                                             tmp_path: Path) -> None:
    """Models pushed by hand (past the push's own check, tests/weights/test_servable.py): creating
    a function of each is a 400 naming what is wrong, and nothing is created."""
    from hydraserve.weights.push import push_model
    from tests.weights.test_servable import BAD_MODELS, bad_model

    auth = {"Authorization": f"Bearer {stack.gateway_token}"}
    for kind, (_change, expected) in BAD_MODELS.items():
        uri = f"{stack.model_uri}-bad-{kind}"
        push_model(bad_model(tiny_llama_dir, tmp_path / kind, kind), uri, progress=False, client=stack.s3.client())
        r = requests.post(stack.gateway_url + "/v1/functions", timeout=30, headers=auth,
                          json={"name": f"bad-{kind}", "model_uri": uri})
        assert r.status_code == 400, (kind, r.text)
        error = r.json()["error"]
        assert error["param"] == "model_uri" and expected in error["message"], (kind, error)
    names = [f["name"] for f in requests.get(stack.gateway_url + "/v1/functions", timeout=10, headers=auth).json()["functions"]]
    assert not [n for n in names if n.startswith("bad-")]
