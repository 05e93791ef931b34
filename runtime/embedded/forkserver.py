"""A node's warm pool: a fork server that imported the runtime once and forks idle workers from it.

Started once per node (`python -m hydraserve.runtime.embedded.forkserver`, inside the node's network
namespace on the emulated cluster, so every child is there too). It imports torch and the
whole runtime, vLLM and our compact engine (7-9 s here: what a spawned worker spends in
`libraries_imported`), does nothing that
starts a thread, then forks ``pool_size`` children that wait, idle, for an assignment. A cold
start *adopts* one (``POST /v1/adopt`` with the worker's environment): the child takes the
function's identity, stage and loaderd lease from that environment and runs the worker from
``http_listening`` on, its imports already done; the pool forks a replacement at once. The
parent only ever forks while it is the only thread of its process (checked before every fork:
fork copies one thread, and a lock another thread held stays locked in the child forever),
which is why this is a select loop and not a threaded server. Where CUDA exists the device is
initialised after the fork, in the child (the worker's first tensor op): a CUDA context does
not survive fork. Not run here (no GPU).

The control API is HTTP/1.1 on a Unix socket (mode 0600) with the node's bearer token:
``POST /v1/adopt``, ``GET /v1/status``, ``GET /v1/exits/<pid>``; ``GET /metrics`` (Prometheus
text) and ``GET /healthz`` are public, as everywhere. An idle child that died is reaped and
replaced, never handed out. An adopted one that exited stays a zombie (its pid cannot be
reused, so the launcher's pidfd and signals name it alone) until the launcher asks for its exit
code, or for ``ADOPTED_REAP_S`` after it exited. Idle children exit when the server goes
(their end of the socket pair reads EOF); adopted workers are the launcher's: it stops them, as
it stops spawned ones. Worker logs may only be written under ``--log-dir``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from hydraserve.errors import (
    HydraError,
    InvalidRequestError,
    NotFoundError,
    TemporaryError,
    UnauthorizedError,
)
from hydraserve.http_json import decode_json

log = logging.getLogger("hydraserve.forkserver")

# What a spawned worker imports before it can load anything (its "libraries" phase; vLLM's own
# modules: hydraserve.runtime.serving.engine.import_vllm).
PRELOAD = ("hydraserve.runtime.worker", "hydraserve.runtime.serving.worker", "hydraserve.runtime.serving.engine",
           "hydraserve.runtime.startup", "hydraserve.runtime.loader_files", "hydraserve.weights.s3",
           "hydraserve.runtime.serving.first_token", "hydraserve.runtime.engine.factory",
           "hydraserve.runtime.model.llama", "hydraserve.runtime.model.opt", "hydraserve.weights.local")
MAX_REQUEST_BYTES = 1 << 20
REQUEST_S = 2.0  # how long a client has to send its whole request (the server serves one at a time)
ACK = b"ok\n"
HAND_OVER_S = 1.0  # how long a pooled child gets to acknowledge its assignment
MAX_HAND_OVERS = 2  # pooled children tried before forking a fresh one (bounds an adoption's time)
ADOPTED_REAP_S = 300.0  # an exited adopted worker nobody asked about is reaped after this


def thread_count() -> int:
    """Threads of this process as the kernel sees them (native ones too, not only Python's)."""
    return len(os.listdir("/proc/self/task"))


def memory_kb(pid: int | str = "self") -> dict[str, int]:
    """Rss, Pss and the private (unshared) kB of a process, from /proc/PID/smaps_rollup."""
    out = {"rss": 0, "pss": 0, "private": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key.lower()] = int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["private"] += int(rest.split()[0])
    return out


@dataclass
class Pooled:
    """One idle child: its pid and the socket its assignment will arrive on."""

    pid: int
    conn: socket.socket
    since: float = field(default_factory=time.time)


class PoolMetrics:
    def __init__(self, node: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"node": node}
        self.size = Gauge("hydraserve_pool_size", "Idle runtime processes the pool keeps", ["node"],
                          registry=self.registry).labels(**labels)
        self.idle = Gauge("hydraserve_pool_idle", "Idle runtime processes ready to be adopted", ["node"],
                          registry=self.registry).labels(**labels)
        self.adopted = Counter("hydraserve_pool_adopted_total", "Workers that started as an adopted pooled process",
                               ["node", "fresh"], registry=self.registry)
        self.forks = Counter("hydraserve_pool_forks_total", "Children forked", ["node"],
                             registry=self.registry).labels(**labels)
        self.idle_deaths = Counter("hydraserve_pool_idle_deaths_total", "Idle children that died and were replaced",
                                   ["node"], registry=self.registry).labels(**labels)
        self.node = node


class ForkServer:
    """The select loop; ``serve_forever`` returns on SIGTERM/SIGINT (idle children then exit)."""

    def __init__(self, socket_path: Path, token: str, pool_size: int, node: str = "",
                 log_dir: Path | None = None) -> None:
        if not token:
            raise ValueError("the fork server needs a non-empty token")
        self.socket_path = socket_path
        self.log_dir = (log_dir or socket_path.parent).resolve()
        self._token = token
        self.pool_size = pool_size
        self.idle: list[Pooled] = []
        self.exits: dict[int, int] = {}  # pid -> exit code of adopted workers reaped, until asked for
        self.adopted: set[int] = set()  # adopted workers not reaped yet
        self._exited_at: dict[int, float] = {}  # adopted workers seen exited (zombies kept for the launcher)
        self.threads_at_fork: list[int] = []  # the thread count before each fork (always 1)
        self.metrics = PoolMetrics(node)
        self.metrics.size.set(pool_size)
        self._stop = False
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None  # the connection being answered (a fresh fork closes it)

    # the loop -----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, self._ask_stop)
        signal.signal(signal.SIGINT, self._ask_stop)
        self.socket_path.unlink(missing_ok=True)
        listener = self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is the owner's alone
        try:
            listener.bind(str(self.socket_path))
        finally:
            os.umask(old)
        listener.listen(64)
        log.info("pool listening", extra={"socket": str(self.socket_path), "pool_size": self.pool_size})
        try:
            while not self._stop:
                self._reap()
                self._refill()
                try:
                    readable, _, _ = select.select([listener], [], [], 0.2)
                except InterruptedError:
                    continue
                if readable:
                    try:
                        self._handle(listener)
                    except OSError as exc:  # EMFILE, a client gone mid-accept: the loop goes on
                        log.warning("control connection failed: %s", exc)
        finally:
            self._shutdown()

    def _ask_stop(self, _signum: int, _frame: object) -> None:
        self._stop = True

    def _shutdown(self) -> None:
        for child in self.idle:
            child.conn.close()  # its recv reads EOF: it exits
        deadline = time.monotonic() + 2
        while self.idle and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)
        for child in self.idle:
            _kill(child.pid)
        if self._listener is not None:
            self._listener.close()
        self.socket_path.unlink(missing_ok=True)

    # children -----------------------------------------------------------------------------
    def _fork(self) -> Pooled:
        threads = thread_count()
        self.threads_at_fork.append(threads)
        if threads != 1:
            raise RuntimeError(f"{threads} threads in the fork server: forking now could copy a held lock")
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # first: the server's handler would swallow it
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 70
            try:
                for inherited in (parent_end, self._listener, self._client, *(c.conn for c in self.idle)):
                    if inherited is not None:
                        inherited.close()
                code = _child(child_end)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # whatever happens, never run the parent's loop
                logging.getLogger("hydraserve.worker").exception("pooled worker failed")
            finally:
                try:
                    _flush()
                finally:
                    os._exit(code)
        child_end.close()
        self.metrics.forks.inc()
        return Pooled(pid, parent_end)

    def _refill(self) -> None:
        while len(self.idle) < self.pool_size and not self._stop:
            try:
                self.idle.append(self._fork())
            except (RuntimeError, OSError) as exc:
                log.error("cannot refill the pool: %s", exc)
                return
        self.metrics.idle.set(len(self.idle))

    def _reap(self) -> None:
        """Collect idle children that died (they leave the pool; _refill replaces them), and
        adopted workers that exited ADOPTED_REAP_S ago without the launcher asking."""
        for child in list(self.idle):
            code = _reap_one(child.pid)
            if code is None:
                continue
            child.conn.close()
            self.idle.remove(child)
            if not self._stop:
                self.metrics.idle_deaths.inc()
                log.warning("idle pooled process %d died (code %d): replaced", child.pid, code)
        now = time.monotonic()
        for pid in list(self.adopted):
            if pid not in self._exited_at and _has_exited(pid):
                self._exited_at[pid] = now
            if now - self._exited_at.get(pid, now) >= ADOPTED_REAP_S:
                self._collect(pid)
                self.exits.pop(pid, None)  # nobody asked in time: forget it

    def _collect(self, pid: int) -> int | None:
        """Reap an adopted worker that exited; its code (None: still running)."""
        if pid in self.exits:
            return self.exits[pid]
        code = _reap_one(pid)
        if code is not None:
            self.exits[pid] = code
            self.adopted.discard(pid)
            self._exited_at.pop(pid, None)
        return code

    def exit_code(self, pid: int) -> int | None:
        """An adopted worker's exit code, once (None: still running or not ours)."""
        if pid not in self.adopted and pid not in self.exits:
            return None
        code = self._collect(pid)
        if code is not None:
            self.exits.pop(pid, None)
        return code

    def adopt(self, env: dict[str, str], log_path: str) -> dict[str, object]:
        """Hand the oldest live idle child its assignment (a fresh fork once MAX_HAND_OVERS idle
        ones did not take it, or none is idle)."""
        path = Path(log_path).resolve()
        if not path.is_relative_to(self.log_dir):
            raise ValueError(f"log_path must be under {self.log_dir}")
        self._reap()
        assignment = json.dumps({"env": env, "log_path": str(path), "adopted_at": time.time()}).encode() + b"\n"
        tried = 0
        while True:
            fresh = not self.idle or tried >= MAX_HAND_OVERS
            tried += 1
            child = self._fork() if fresh else self.idle.pop(0)
            if not _hand_over(child, assignment):  # it died (or is dying) since the last reap
                child.conn.close()
                _kill(child.pid)
                _reap_one(child.pid, wait_s=1.0)
                self.metrics.idle_deaths.inc()
                log.warning("pooled process %d did not take its assignment: not handed out", child.pid)
                if fresh:
                    raise RuntimeError("a freshly forked process did not take its assignment")
                continue
            child.conn.close()
            self.adopted.add(child.pid)
            self.metrics.adopted.labels(self.metrics.node, str(fresh).lower()).inc()
            self.metrics.idle.set(len(self.idle))
            return {"pid": child.pid, "fresh": fresh, "pooled_s": round(time.time() - child.since, 3)}

    def status(self) -> dict[str, object]:
        idle_memory = []
        for child in self.idle:
            try:
                idle_memory.append(memory_kb(child.pid))
            except OSError:  # exited since the last reap: the next one replaces it
                continue
        return {"pool_size": self.pool_size, "idle": [c.pid for c in self.idle], "adopted": sorted(self.adopted),
                "threads_at_fork": sorted(set(self.threads_at_fork)), "server_memory_kb": memory_kb(),
                "idle_memory_kb": idle_memory}

    # HTTP/1.1 on the Unix socket, one request per connection ------------------------------
    def _handle(self, listener: socket.socket) -> None:
        conn, _ = listener.accept()
        try:
            request = _read_request(conn, time.monotonic() + REQUEST_S)
        except ValueError as exc:  # a malformed request line, header or length
            _write_response(conn, 400, InvalidRequestError(str(exc)).to_openai())
            return
        except OSError:
            conn.close()
            return
        self._client = conn
        try:
            status, body = 200, self._route(*request)
        except HydraError as exc:
            status, body = exc.status, exc.to_openai()
        except ValueError as exc:  # what the request asked cannot be done (a log path outside --log-dir)
            status, body = 400, InvalidRequestError(str(exc)).to_openai()
        except (RuntimeError, OSError) as exc:  # no child could be had (fork failed, ...)
            status, body = 503, TemporaryError(f"no pooled process: {exc}").to_openai()
        finally:
            self._client = None
        delivered = _write_response(conn, status, body)
        if not delivered and request[:2] == ("POST", "/v1/adopt") and status == 200:
            assert isinstance(body, dict)
            log.warning("the launcher left before it heard of worker %d: stopping it", body["pid"])
            _kill(body["pid"])  # nobody would ever stop it (it holds its leases until then)

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> object:
        """The answer of a route; errors are the platform's classes, sent as every service does."""
        if path == "/healthz":
            return {"status": "ok", "idle": len(self.idle)}
        if path == "/metrics":
            return generate_latest(self.metrics.registry)
        supplied = headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), self._token.encode()):
            raise UnauthorizedError("a valid bearer token is required")
        if (method, path) == ("GET", "/v1/status"):
            return self.status()
        if method == "GET" and path.startswith("/v1/exits/"):
            pid = path.removeprefix("/v1/exits/")
            if not pid.isdigit():
                raise InvalidRequestError("/v1/exits/<pid>: a process id")
            return {"pid": int(pid), "code": self.exit_code(int(pid))}
        if (method, path) == ("POST", "/v1/adopt"):
            request = decode_json(body or b"null")
            if not (isinstance(request, dict) and isinstance(request.get("env"), dict)
                    and isinstance(request.get("log_path"), str)
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items())):
                raise InvalidRequestError("body must be {\"env\": {str: str}, \"log_path\": str}")
            return self.adopt(request["env"], request["log_path"])
        raise NotFoundError(f"no route {method} {path}")


def _child(conn: socket.socket) -> int:
    """A pooled process: wait for an assignment, then become that worker (its exit code)."""
    os.setsid()  # its own session, as a spawned worker has: stopped as a group
    line = conn.makefile("rb").readline()
    if not line:
        return 0  # the server went away before anyone adopted me
    assignment = json.loads(line)
    log_path = Path(assignment["log_path"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.update(assignment["env"])
    conn.sendall(ACK)  # I live, took it and have my log: the server hands me out
    conn.close()
    import random

    import torch

    random.seed()
    torch.seed()  # not the fork server's generator state, shared by every sibling
    from hydraserve.contracts.worker import WorkerEnvironment
    from hydraserve.logs import configure_logging
    from hydraserve.runtime.worker import run

    configure_logging("worker")
    return run(WorkerEnvironment.from_env(), adopted_at=float(assignment["adopted_at"]))


def _reap_one(pid: int, wait_s: float = 0.0) -> int | None:
    """Reap one child if it exited (waiting up to ``wait_s``); its exit code, or None."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return -1  # not ours any more
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _has_exited(pid: int) -> bool:
    """Whether a child exited, without reaping it (its pid stays taken)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _hand_over(child: Pooled, assignment: bytes, timeout_s: float = HAND_OVER_S) -> bool:
    """Send the assignment and wait for the child's acknowledgement: a child being killed can
    still have its socket buffer the message, but it never answers."""
    try:
        child.conn.settimeout(timeout_s)
        child.conn.sendall(assignment)
        return child.conn.recv(len(ACK)) == ACK
    except OSError:
        return False


def _read_request(conn: socket.socket, deadline: float) -> tuple[str, str, dict[str, str], bytes]:
    """One request, all of it before ``deadline`` (a client sending a byte a second must not
    hold the server, which serves one connection at a time; socket.timeout otherwise)."""
    def recv() -> bytes:
        conn.settimeout(max(0.001, deadline - time.monotonic()))
        return conn.recv(65536)

    data = b""
    while b"\r\n\r\n" not in data:
        chunk = recv()
        if not chunk:
            raise ValueError("the request ended before its headers")
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    if length > MAX_REQUEST_BYTES:
        raise ValueError("request too large")
    while len(body) < length:
        chunk = recv()
        if not chunk:
            raise ValueError("the request ended before its body")
        body += chunk
    return method, path.split("?", 1)[0], headers, body[:length]


def _write_response(conn: socket.socket, status: int, body: object) -> bool:
    """Whether the answer reached the client's socket (False: it had left)."""
    if isinstance(body, bytes):
        payload, kind = body, "text/plain; version=0.0.4"
    else:
        payload, kind = json.dumps(body).encode(), "application/json"
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
    try:
        conn.sendall(head + payload)
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _flush() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hydraserve.runtime.embedded.forkserver",
                                     description="A node's warm pool of pre-imported runtime processes")
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket it listens on (mode 0600)")
    parser.add_argument("--token-file", type=Path, required=True, help="file holding the bearer token")
    parser.add_argument("--pool-size", type=int, default=1, help="idle processes it keeps (0: fork on demand)")
    parser.add_argument("--node", default="", help="the node's name (metrics label)")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where adopted workers may write their logs (default: the socket's directory)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS pool would be a thread before the fork
    from hydraserve.auth import read_token
    from hydraserve.logs import configure_logging

    configure_logging("forkserver")
    token = read_token(str(args.token_file), "")
    started = time.monotonic()
    import importlib

    from hydraserve.runtime.serving.args import PROCESS_ENV

    os.environ.update(PROCESS_ENV)  # before vLLM (and huggingface_hub) read them
    for module in PRELOAD:
        importlib.import_module(module)
    from hydraserve.runtime.serving.engine import import_vllm

    import_vllm()  # what a worker would import, and vLLM's argument parser built
    import gc

    gc.freeze()  # the imported heap: children never walk (nor copy-on-write) it in a collection
    log.info("runtime imported", extra={"seconds": round(time.monotonic() - started, 3), "threads": thread_count()})
    if not token:
        raise SystemExit("the token file is empty")
    ForkServer(args.socket, token, max(0, args.pool_size), args.node, args.log_dir).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
