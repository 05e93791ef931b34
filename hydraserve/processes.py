"""Child processes of the platform (workers, loaderd, the placement service) with their logs.

One place for the spawn / wait-until-healthy / SIGTERM-then-SIGKILL lifecycle, used by the
local backend (workers), the embedded stack (services) and loaderd's spawner.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Protocol

import requests


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Raise OSError naming ``host:port`` if something listens there (checked before slow set-up)."""
    if port == 0:
        return
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"{host}:{port} is not free ({exc.strerror})") from None


def raise_open_files_limit() -> int:
    """Lift this process's open-file limit to its hard limit (a gateway holding a burst needs a
    socket per parked request, twice over with its upstreams); the new limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def hydraserve_command(*args: str) -> list[str]:
    """argv running `hydraserve ARGS` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "hydraserve.cli", *args]


def tail_lines(path: Path, n: int, *, max_bytes: int = 1 << 20, block: int = 1 << 16) -> str:
    """The last ``n`` lines of ``path`` within its last ``max_bytes``, read back from its end (a
    worker's log grows for as long as it serves: a reader must not load it whole); "" if it
    cannot be read."""
    try:
        with path.open("rb") as f:
            start = f.seek(0, os.SEEK_END)
            data = b""
            while start > 0 and len(data) < max_bytes and data.count(b"\n") <= n:
                step = min(block, start, max_bytes - len(data))
                start -= step
                f.seek(start)
                data = f.read(step) + data
    except OSError:
        return ""
    lines = data.decode(errors="replace").splitlines()
    return "\n".join(lines[1 if start > 0 else 0:][-n:])  # a line cut at the start of what was read is left out


class ProcessHandle(Protocol):
    """What ChildProcess uses of a process: subprocess.Popen's, or an adopted pooled worker's
    (hydraserve.runtime.embedded.forkserver_client.AdoptedProcess)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class ChildProcess:
    """A child in its own session, stdout+stderr appended to ``log_path`` (or discarded);
    ``proc``: a process that already runs in its own session (adopted from a warm pool)
    instead of spawning ``argv``."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path | None,
                 env: dict[str, str] | None = None, proc: ProcessHandle | None = None) -> None:
        self.name = name
        self.log_path = log_path
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self.spawned_at = time.time()
        self._stop_asked = False
        self._log: IO[bytes] | None = None
        if proc is not None:
            self.proc: ProcessHandle = proc
            return
        self._log = open(log_path, "ab") if log_path else None  # lives as long as the child
        self.proc = subprocess.Popen(list(argv), env={**os.environ, **(env or {})},
                                     stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_until(self, probe: Callable[[], bool], timeout_s: float, *, poll_s: float = 0.05,
                   on_exit: Callable[[int], Exception] | None = None) -> bool:
        """Poll ``probe`` until it is true (True), the deadline passes (False) or the child
        exits (raises ``on_exit(code)``, by default a RuntimeError with the log's tail)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise (on_exit(code) if on_exit else RuntimeError(
                    f"{self.name} exited with code {code}; log {self.log_path}:\n{self.log_tail()}"))
            if probe():
                return True
            time.sleep(poll_s)
        return False

    def wait_healthy(self, url: str, timeout_s: float = 60.0) -> None:
        """Until GET ``url`` answers 2xx; RuntimeError (after stopping the child) otherwise."""
        def healthy() -> bool:
            try:
                return requests.get(url, timeout=1).ok
            except requests.RequestException:
                return False

        if not self.wait_until(healthy, timeout_s):
            self.stop(grace_s=2)
            raise RuntimeError(f"{self.name} not healthy within {timeout_s:.0f} s; log {self.log_path}")

    def log_tail(self, n: int = 20) -> str:
        return "(no log)" if self.log_path is None else tail_lines(self.log_path, n)

    def lost(self) -> bool:
        """Whether the child is gone without stop() having been asked (killed, crashed)."""
        return not self._stop_asked and self.proc.poll() is not None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (the child drains), then SIGKILL to its whole session after ``grace_s``."""
        self._stop_asked = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
        return self.proc.returncode
