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
from hydraserve.provider.embedded.process import ProcessLauncher, WorkerProcess


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
