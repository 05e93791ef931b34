"""The worker as a real child process: start-up timeline, serving, SIGTERM drain, failure reason."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import pytest
import requests

from hydraserve.contracts.worker import WorkerEnvironment
from hydraserve.errors import NotFoundError, fails_every_start
from hydraserve.provider.backends.process import ProcessLauncher, WorkerProcess


def launch(run_dir: Path, **env: object) -> WorkerProcess:
    """One worker through the process launcher, as the cold start launches it."""
    launcher = ProcessLauncher(run_dir)
    slot = launcher.reserve("node")
    return launcher.launch("node", WorkerEnvironment.model_validate(
        {"host": slot.host, "port": slot.port, "transport_port": slot.transport_port, "spawned_at": time.time(),
         **env}))

# config and tokenizer are read while the libraries import: either may end first
STARTUP_ORDER = ["process_started", "http_listening", {"libraries_imported", "config_loaded"},
                 "weights_attached", "first_tensor_loaded", "weights_loaded", "warmed_up", "engine_ready"]


def in_startup_order(names: list[str]) -> bool:
    steps = [{s} if isinstance(s, str) else s for s in STARTUP_ORDER]
    ranks = {name: i for i, step in enumerate(steps) for name in step}
    seen = [ranks[n] for n in names if n in ranks]
    return seen == sorted(seen) and set(seen) == set(range(len(steps)))


def test_worker_serves_reports_timeline_and_drains_on_sigterm(tiny_llama_dir: Path, tmp_path: Path) -> None:
    worker = launch(tmp_path, model_uri=str(tiny_llama_dir), function="tiny")
    try:
        worker.wait_ready(timeout_s=120)
        events = requests.get(worker.url + "/v1/hydraserve/timeline", timeout=5).json()["events"]
        names = [e["name"] for e in events]
        assert in_startup_order(names)
        assert all(a["at"] <= b["at"] for a, b in itertools.pairwise(events))

        # A long streaming request is in flight when SIGTERM arrives: it must finish.
        received: list[str] = []

        def stream() -> None:
            with requests.post(worker.url + "/v1/completions", stream=True, timeout=60,
                               json={"prompt": "Once", "max_tokens": 200, "temperature": 0,
                                     "stream": True}) as r:
                received.extend(line.decode() for line in r.iter_lines() if line)

        t = threading.Thread(target=stream)
        t.start()
        deadline_ok = False
        for _ in range(200):  # wait until the first chunk is out
            if received:
                deadline_ok = True
                break
            threading.Event().wait(0.02)
        assert deadline_ok, "stream did not start"
        assert worker.stop(grace_s=60) == 0
        t.join(30)
        assert received[-1] == "data: [DONE]"
        last = json.loads(received[-2][len("data: "):])
        assert last["choices"][0]["finish_reason"] is not None
    finally:
        worker.stop(grace_s=5)


def test_worker_failure_reason_and_class_reach_the_caller(tmp_path: Path) -> None:
    """A worker that cannot start says why in its /readyz, naming its error's class: the launcher
    raises the same class (a missing model is a NotFoundError, which fails its function for good,
    not a retryable 503)."""
    worker = launch(tmp_path, model_uri=str(tmp_path / "no-such-model"))
    try:
        with pytest.raises(NotFoundError, match="no-such-model") as caught:
            worker.wait_ready(timeout_s=60)
        assert fails_every_start(caught.value)
    finally:
        worker.stop(grace_s=5)


def test_a_group_of_worker_processes_is_ready_only_whole_and_notices_a_dead_stage(tmp_path: Path) -> None:
    """Head and inner stage as real workers, neither given memory for the whole model: the head's
    /readyz stays 503 until the inner stage serves, and a probe that reached the head's stage
    port first (speaking frames, as the previous stage would) is refused, not linked; then
    completions through the head equal a standalone worker's; the group's link secret is in no
    log, status or timeline of either worker; the inner stage serves no API; the group stays a
    group (no full worker); SIGKILL on the inner stage turns the head failed with the reason."""
    import os
    import secrets
    import signal
    import socket

    from pydantic import SecretStr

    from hydraserve.contracts.stage import StagePlan
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model
    from hydraserve.runtime.engine.factory import load_engine
    from hydraserve.runtime.engine.types import SamplingParams
    from hydraserve.runtime.transport import frames

    model_dir = make_tiny_model(tmp_path / "m", TinySpec(arch="llama", layers=4, kv_heads=2))
    launcher = ProcessLauncher(tmp_path)
    slots = [launcher.reserve("node") for _ in range(2)]
    peers = [s.transport_address for s in slots]
    plan = StagePlan.from_boundaries(4, [0, 2, 4])
    link_secret = secrets.token_urlsafe(32)  # the launcher's, fresh for this group
    envs = [WorkerEnvironment(
        model_uri=str(model_dir), function="grp", instance_id="grp-1", host=slot.host, port=slot.port,
        transport_port=slot.transport_port, stage=stage, peers=peers, full=False, max_batch=2, link_timeout_s=60,
        engine="compact", link_secret=SecretStr(link_secret))  # its TCP ring, proven by the group's secret
        for slot, stage in zip(slots, plan.stages, strict=True)]

    def start(i: int) -> WorkerProcess:
        return launcher.launch("node", envs[i].model_copy(update={"spawned_at": time.time()}))

    head = start(0)
    inner = None
    probe = None
    try:
        deadline = time.monotonic() + 30
        while probe is None:  # first at the head's stage port, as soon as it listens
            try:
                probe = socket.create_connection((slots[0].host, slots[0].transport_port), timeout=30)
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, head.log_tail()
                time.sleep(0.05)
        frames.send(probe, frames.Frame("ping", {"seq": 0}))
        time.sleep(4)  # the head has loaded and waits for its group
        assert requests.get(head.url + "/readyz", timeout=5).status_code == 503
        try:
            assert probe.recv(1 << 16) == b""  # refused: closed without a word
        except ConnectionResetError:
            pass
        inner = start(1)
        head.wait_ready(timeout_s=120)
        inner.wait_ready(timeout_s=60)
        body = {"prompt": "The lighthouse keeper", "max_tokens": 8, "temperature": 0}
        got = requests.post(head.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
        alone = load_engine(model_dir)
        try:
            want = alone.submit(alone.tokenizer.encode(body["prompt"]),
                                SamplingParams(max_tokens=8, temperature=0.0)).collect().token_ids
        finally:
            alone.shutdown()
        assert got == want
        assert "refused a stage link" in head.log_path.read_text()  # type: ignore[union-attr]
        for worker, env in zip((head, inner), envs, strict=True):
            seen = [worker.log_path.read_text(), repr(env), str(env), env.model_dump_json()]  # type: ignore[union-attr]
            seen += [requests.get(worker.url + path, timeout=5).text for path in
                     ("/readyz", "/healthz", "/metrics", "/v1/hydraserve/timeline")]
            assert not [text for text in seen if link_secret in text]
        assert requests.post(inner.url + "/v1/completions", json=body, timeout=5).status_code == 404
        names = [e["name"] for e in requests.get(head.url + "/v1/hydraserve/timeline", timeout=5).json()["events"]]
        assert "group_linked" in names and names.index("group_linked") < names.index("engine_ready")
        assert "consolidation_fetch_started" not in names
        assert requests.get(head.url + "/readyz", timeout=5).json()["consolidated"] is False

        os.kill(inner.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and requests.get(head.url + "/healthz", timeout=5).status_code == 200:
            time.sleep(0.1)
        health = requests.get(head.url + "/healthz", timeout=5)
        assert health.status_code == 500 and "pipeline group" in health.json()["reason"]
        assert requests.get(head.url + "/readyz", timeout=5).status_code == 503
    finally:
        head.stop(grace_s=5)
        if inner is not None:
            inner.stop(grace_s=5)
        if probe is not None:
            probe.close()
