"""One worker as a local child process: spawn with settings in the env, wait for readiness,
drain with SIGTERM. Used by the local backend; no placement logic here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from hydraserve.errors import TemporaryError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class WorkerProcess:
    """A `python -m hydraserve.runtime.worker` child with its log file."""

    def __init__(self, env: dict[str, str], log_path: Path, host: str = "127.0.0.1") -> None:
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, **env, "PORT": str(self.port), "HYDRASERVE_HOST": host,
                    "HYDRASERVE_SPAWNED_AT": repr(time.time())}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.spawned_at = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "hydraserve.runtime.worker"], env=full_env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float, poll_s: float = 0.02) -> None:
        """Return when /readyz says ready; raise TemporaryError with the reason otherwise."""
        deadline = time.monotonic() + timeout_s
        session = requests.Session()
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise TemporaryError(f"worker exited with code {code}: {self.failure_reason()}")
            try:
                r = session.get(self.url + "/readyz", timeout=1.0)
                if r.status_code == 200:
                    return
                body = r.json()
                if body.get("status") == "failed":
                    self.stop(grace_s=2)
                    raise TemporaryError(f"worker failed to start: {body.get('reason')}")
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(poll_s)
        self.stop(grace_s=2)
        raise TemporaryError(f"worker not ready within {timeout_s:.0f} s (log: {self.log_path})")

    def failure_reason(self) -> str:
        """The last error the worker logged (its JSON log lines), for the 503 message."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-50:]
        except OSError:
            return "no log"
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                if line.strip():
                    return line.strip()[-300:]
                continue
            if entry.get("level") in ("error", "critical"):
                exc = str(entry.get("exc", "")).strip().splitlines()
                return exc[-1] if exc else str(entry.get("msg"))
        return lines[-1][-300:] if lines else "no output"

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM (the worker drains), then SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode
