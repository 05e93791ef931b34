"""Start platform components as real child processes and wait until they answer.

Used by the local stack (demo, up) and the end-to-end tests: each service runs as
`python -m hydraserve.cli <command> ...` with its log in the run directory, and is stopped
with SIGTERM (its drain path), then SIGKILL if it hangs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests


class ServiceProcess:
    """One `hydraserve <command>` child process with a health URL."""

    def __init__(self, name: str, args: list[str], *, health_url: str, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.health_url = health_url
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "hydraserve.cli", *args],
                                     env={**os.environ, **(env or {})}, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def wait_healthy(self, timeout_s: float = 60.0) -> ServiceProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if requests.get(self.health_url, timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not healthy within {timeout_s:.0f} s; log {self.log_path}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode
