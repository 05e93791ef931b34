"""The launcher's side of a node's warm pool (runtime/embedded/forkserver.py): adopt a pooled process,
read the pool's status, and watch an adopted worker that is not the launcher's child.

Light (no torch): the process launcher imports it. An adopted worker is the fork server's child,
so the launcher cannot wait() for it; ``AdoptedProcess`` gives it the subset of
``subprocess.Popen`` the launcher uses (poll, wait, send_signal, pid, returncode) through a
pidfd, which becomes readable when the process exits and never names a recycled pid; its exit
code comes from the fork server, which reaps it.
"""

from __future__ import annotations

import math
import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hydraserve.errors import HydraError, NotListeningError, TemporaryError
from hydraserve.http_client import ServiceClient, unix_socket_session

UNKNOWN_EXIT = -255  # the fork server that reaped it is gone: its code is lost


@dataclass(frozen=True)
class Adoption:
    pid: int
    fresh: bool  # no idle process was left: forked on demand (still without the import)
    pooled_s: float  # how long it waited in the pool


class ForkServerClient:
    """Calls to one node's fork server over its Unix socket (one connection per call)."""

    def __init__(self, socket_path: Path, token: str, timeout_s: float = 10.0) -> None:
        self.socket_path = socket_path
        self._client = ServiceClient(f"warm pool at {socket_path}", "http://unix", token, timeout_s=timeout_s,
                                     session=unix_socket_session(socket_path))

    def _call(self, method: str, path: str, body: object | None = None) -> object:
        """NotListeningError: nothing listens (the request never arrived); UnreachableError: it
        may have arrived but no answer came (an adoption may have happened: do not spawn); else
        the class the server's answer names (a wrong token is no reason to try again)."""
        response = self._client.request(method, path, json=body)
        is_json = response.headers.get("Content-Type", "").startswith("application/json")
        return response.json() if is_json else response.content

    def adopt(self, env: dict[str, str], log_path: Path) -> AdoptedProcess:
        """A pooled process becomes the worker ``env`` describes, its output appended to ``log_path``."""
        answer = self._call("POST", "/v1/adopt", {"env": env, "log_path": str(log_path)})
        assert isinstance(answer, dict)
        adoption = Adoption(int(answer["pid"]), bool(answer["fresh"]), float(answer["pooled_s"]))
        try:
            return AdoptedProcess(adoption, self)
        except OSError as exc:  # the server keeps it a zombie until asked: only a reaped pid gets here
            raise TemporaryError(f"adopted worker {adoption.pid} is gone: {exc}") from exc

    def status(self) -> dict[str, object]:
        answer = self._call("GET", "/v1/status")
        assert isinstance(answer, dict)
        return answer

    def metrics(self) -> str:
        return self._client.request("GET", "/metrics").text

    def exit_code(self, pid: int) -> int | None:
        """An adopted worker's exit code, reaped by the server when asked (None: not yet, or no
        answer this time; UNKNOWN_EXIT: the server is gone, and the code with it)."""
        try:
            answer = self._call("GET", f"/v1/exits/{pid}")
        except NotListeningError:
            return UNKNOWN_EXIT
        except HydraError:
            return None
        assert isinstance(answer, dict)
        code = answer.get("code")
        return int(code) if code is not None else None


class AdoptedProcess:
    """An adopted worker, watched through a pidfd (the part of Popen the launcher uses)."""

    def __init__(self, adoption: Adoption, pool: ForkServerClient) -> None:
        self.adoption = adoption
        self.pid = adoption.pid
        self._pool = pool
        self._pidfd = os.pidfd_open(self.pid)  # taken while it runs: it was handed its work a moment ago
        self._lock = threading.Lock()
        self.returncode: int | None = None

    def _exited(self, timeout_s: float) -> bool:
        poller = select.poll()  # not select(): the launcher's process may hold fds past 1024
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout_s) * 1000))

    def poll(self) -> int | None:
        if self.returncode is None and self._exited(0):
            self._settle(0.5)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not self._exited(3600.0 if timeout is None else timeout):
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            self._settle(1.0)
        assert self.returncode is not None
        return self.returncode

    def _settle(self, within_s: float) -> None:
        """It exited: its code, once the fork server (polling every 0.2 s) reaped it."""
        with self._lock:  # the launcher's threads poll and stop the same worker
            if self.returncode is not None:
                return
            deadline = time.monotonic() + within_s
            code = self._pool.exit_code(self.pid)
            while code is None and time.monotonic() < deadline:
                time.sleep(0.05)
                code = self._pool.exit_code(self.pid)
            self.returncode = code if code is not None else UNKNOWN_EXIT

    def __del__(self) -> None:  # kept open until then: another thread may still select on it
        os.close(self._pidfd)

    def send_signal(self, sig: int) -> None:
        with self._lock:
            if self.returncode is None:
                try:
                    signal.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:  # exited meanwhile (as Popen, not an error)
                    pass


def pool_memory_gb(status: dict[str, object]) -> float:
    """What a pool holds, from its status: the fork server's resident memory (its pages are
    shared by every child, counted once) plus each idle child's private pages, in GB rounded up
    to 0.1 (the placement service's unit)."""
    server = status["server_memory_kb"]
    idle = status["idle_memory_kb"]
    assert isinstance(server, dict) and isinstance(idle, list)
    kb = int(server["rss"]) + sum(int(m["private"]) for m in idle)
    return math.ceil(kb * 1024 / 1e9 * 10) / 10


def serving_status(pool: ForkServerClient) -> dict[str, object] | None:
    """The pool's status if its fork server answers and every idle process exists, else None."""
    try:
        status = pool.status()
    except HydraError:
        return None
    idle = status["idle"]
    return status if isinstance(idle, list) and len(idle) >= int(str(status["pool_size"])) else None


def wait_until_serving(pool: ForkServerClient, timeout_s: float, poll_s: float = 0.05) -> dict[str, object]:
    """The pool's status once it is serving (``serving_status``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serving_status(pool)
        if status is not None:
            return status
        if time.monotonic() > deadline:
            raise TemporaryError(f"warm pool at {pool.socket_path} not serving within {timeout_s:.0f} s")
        time.sleep(poll_s)
