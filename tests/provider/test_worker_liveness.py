"""A ready worker whose process runs but answers nothing any more (deadlocked: its event loop
blocked, a lock never released) counts as lost, so its instance fails over (issue 22: a frozen
worker was detected, a deadlocked one was not). The worker here is a real process over real
HTTP, a single-threaded server that stops answering when told to, as a deadlocked worker would;
one that answers with an error (a failed worker says why) is not lost."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from hydraserve.processes import free_port
from hydraserve.provider.embedded import process
from hydraserve.provider.embedded.process import WorkerProcess
from tests.conditions import wait_for

SERVER = r"""
import http.server, json, os, sys, time

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if os.path.exists(sys.argv[2]):  # deadlocked: this single-threaded server never answers again
            time.sleep(3600)
        failing = os.path.exists(sys.argv[3])
        body = json.dumps({"status": "failed" if failing else "ready", "reason": "boom" if failing else None}).encode()
        self.send_response(500 if failing and self.path == "/healthz" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture(autouse=True)
def _quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "UNRESPONSIVE_AFTER_S", 1.5)
    monkeypatch.setattr(process, "PROBE_EVERY_S", 0.2)


def start(tmp_path: Path) -> tuple[WorkerProcess, Path, Path]:
    port = free_port()
    hang, fail = tmp_path / "hang", tmp_path / "fail"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(hang), str(fail)], start_new_session=True)
    worker = WorkerProcess({}, tmp_path / "worker.log", time.time(), f"http://127.0.0.1:{port}", label="w", proc=proc)
    worker.wait_ready(15)
    return worker, hang, fail


def test_a_ready_worker_that_stops_answering_while_it_runs_is_lost(tmp_path: Path) -> None:
    worker, hang, _ = start(tmp_path)
    try:
        time.sleep(0.6)
        assert not worker.lost()
        hang.touch()
        assert wait_for(worker.lost, 10), "a deadlocked worker was never counted lost"
        assert worker.proc.poll() is None  # it runs: lost because it is silent, not because it is gone
    finally:
        worker.stop(grace_s=1)
    assert worker.proc.poll() is not None


def test_a_worker_that_answers_with_its_failure_is_not_lost(tmp_path: Path) -> None:
    worker, _, fail = start(tmp_path)
    try:
        fail.touch()  # /healthz answers 500 with the reason: the instance is failed, not lost
        time.sleep(2.5)
        assert not worker.lost()
    finally:
        worker.stop(grace_s=1)
