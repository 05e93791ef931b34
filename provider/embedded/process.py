"""The process launcher: workers as local child processes (the WorkerLauncher of the embedded
default). A worker is spawned with its environment (hydraserve.contracts.worker), waited for
until /readyz answers, drained with SIGTERM. Each node is a NodeHost: on loopback every node
shares 127.0.0.1; on the emulated cluster a node's workers run in its network namespace (the
command prefix) and listen on its address, so their traffic crosses its capped link. A node
with a warm pool (runtime/embedded/forkserver.py) has each worker adopted from it, its imports already
done; if the pool does not answer, the worker is spawned as before (logged). Used by the local
backend; no placement here.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from hydraserve.auth import SCOPED_TOKEN
from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerEnvironment, WorkerStatus
from hydraserve.errors import HydraError, NotListeningError, TemporaryError
from hydraserve.leftovers import LEFTOVERS_KEY, remove_leftovers
from hydraserve.logs import redact, secret_values
from hydraserve.processes import ChildProcess, ProcessHandle, free_port, tail_lines
from hydraserve.provider.worker_port import WorkerSlot, worker_status, worker_timeline
from hydraserve.runtime.embedded.forkserver_client import ForkServerClient

log = logging.getLogger(__name__)

FROZEN_AFTER_S = 3.0  # a worker stopped by a signal this long counts as lost (its instance fails over)
UNRESPONSIVE_AFTER_S = 10.0  # a ready worker whose process runs but answers no /livez this long: deadlocked
PROBE_EVERY_S = 1.0  # how often a ready worker's /livez is asked (1 s timeout)


@dataclass(frozen=True)
class NodeHost:
    """Where a node's processes run: the address they listen on, and the command prefix that
    puts them in the node's network namespace (``ip netns exec NS``; empty on loopback)."""

    ip: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()


# A namespace holds only this launcher's workers (and its loaderd, below this range): ports are
# handed out in turn instead of probed, since the namespace's ports cannot be probed from here.
_NAMESPACE_PORTS = range(41000, 61000)


class ProcessLauncher:
    """Launches workers as children of this process, each on its node's host."""

    def __init__(self, run_dir: Path, *, extra_env: dict[str, str] | None = None,
                 hosts: Mapping[str, NodeHost] | None = None, pools: Mapping[str, ForkServerClient] | None = None) -> None:
        self.run_dir = run_dir
        self._extra_env = dict(extra_env or {})  # e.g. S3 credentials for the direct-S3 path
        self._hosts = dict(hosts or {})  # node -> host; a node not named here is on loopback
        self.pools = dict(pools or {})  # node -> its warm pool; a node not named here spawns
        run_dir.mkdir(parents=True, exist_ok=True)  # an adopted worker opens its log itself
        self._next_port: dict[str, int] = {}
        self._launched: list[WorkerProcess] = []
        self._lock = threading.Lock()

    def reserve(self, node: str) -> WorkerSlot:
        host = self._hosts.get(node, NodeHost())
        if not host.prefix:
            return WorkerSlot(host.ip, free_port(host.ip), free_port(host.ip))
        with self._lock:
            offset = self._next_port.get(node, 0)
            self._next_port[node] = (offset + 2) % len(_NAMESPACE_PORTS)
        port = _NAMESPACE_PORTS[offset]
        return WorkerSlot(host.ip, port, port + 1)

    def launch(self, node: str, env: WorkerEnvironment) -> WorkerProcess:
        instance, stage = env.instance_id or env.function, env.stage.index if env.stage else 0
        label = f"{instance}-{stage}"
        log_path = self.log_path(instance, stage)
        variables = {**self._extra_env, **env.to_env(), LEFTOVERS_KEY: str(log_path.with_suffix(".leftovers"))}
        adopted: ProcessHandle | None = None
        pool = self.pools.get(node)
        if pool is not None:
            try:
                adopted = pool.adopt(variables, log_path)
            except NotListeningError as exc:  # it never got the request: spawning cannot start it twice
                log.warning("warm pool of %s does not answer, spawning the worker: %s", node, exc.message)
        worker = WorkerProcess(variables, log_path, env.spawned_at or time.time(), f"http://{env.host}:{env.port}",
                               label=label, node=node, prefix=self._hosts.get(node, NodeHost()).prefix, proc=adopted)
        with self._lock:
            self._launched = [w for w in self._launched if w.proc.poll() is None] + [worker]
        return worker

    def log_path(self, instance_id: str, stage: int) -> Path:
        """Where the worker of ``instance_id``'s ``stage`` writes its output (kept after it stops)."""
        return self.run_dir / f"{instance_id}-{stage}.log"

    def read_log(self, instance_id: str, stage: int, tail: int) -> str | None:
        """The last ``tail`` lines of that worker's log (None: it has none), with the secrets
        workers are handed blanked out: a worker redacts its JSON lines itself, but not raw
        output (a traceback printed before its logging was set up, a library's own lines)."""
        path = self.log_path(instance_id, stage)
        if not path.is_file():
            return None
        return SCOPED_TOKEN.sub("***", redact(tail_lines(path, tail), secret_values(self._extra_env)))

    def running(self) -> list[WorkerProcess]:
        """Workers whose process is alive (what a teardown must have stopped)."""
        with self._lock:
            return [w for w in self._launched if w.proc.poll() is None]


class WorkerProcess(ChildProcess):
    """A `python -m hydraserve.runtime.worker` child (or a pooled process adopted as one:
    ``proc``); its 503 reasons come from its JSON log."""

    def __init__(self, env: dict[str, str], log_path: Path, spawned_at: float, url: str, *,
                 label: str = "", node: str = "", prefix: Sequence[str] = (), proc: ProcessHandle | None = None) -> None:
        super().__init__("worker", [*prefix, sys.executable, "-m", "hydraserve.runtime.worker"], log_path=log_path,
                         env=env, proc=proc)
        self.adopted = proc is not None
        self._frozen_since: float | None = None
        self._liveness: Liveness | None = None  # once ready
        self.leftovers = Path(env[LEFTOVERS_KEY]) if LEFTOVERS_KEY in env else None  # what it wrote down
        self.url = url
        self.label = label  # <instance>-<stage>
        self.node = node
        # The worker clamps its /proc start time (10 ms ticks) to the spawn moment its env says.
        self.spawned_at = spawned_at

    def lost(self) -> bool:
        """Gone without being stopped, frozen (stopped by a signal: SIGSTOP, a debugger) for
        FROZEN_AFTER_S, or, once ready, silent on /livez for UNRESPONSIVE_AFTER_S while it runs
        (deadlocked): its requests would wait for as long as it stays so (issue 22 item 8: 50 s
        frozen, 50 s stalled, no failover). Cheap: a read of /proc and of the last probe's time."""
        if super().lost():
            return True
        if self._liveness is not None and self._liveness.silent_for() >= UNRESPONSIVE_AFTER_S:
            return True  # deadlocked (its loop blocked, a lock never released): nothing would answer its requests
        if not _stopped_by_signal(self.proc.pid):
            self._frozen_since = None
            return False
        now = time.monotonic()
        self._frozen_since = self._frozen_since or now
        return now - self._frozen_since >= FROZEN_AFTER_S

    def stop(self, grace_s: float = 10.0) -> int | None:
        """Stop it, then remove what it wrote down and could not remove itself (killed)."""
        if self._liveness is not None:
            self._liveness.stop()
        code = super().stop(grace_s)
        removed = remove_leftovers(self.leftovers) if self.leftovers is not None else []
        if removed:
            log.info("removed what worker %s left behind: %s", self.label, ", ".join(removed))
        return code

    def wait_ready(self, timeout_s: float, poll_s: float = 0.02) -> None:
        """Return when /readyz says ready; raise TemporaryError with the reason otherwise."""
        session = requests.Session()
        failed: list[HydraError] = []

        def ready() -> bool:
            try:
                r = session.get(self.url + "/readyz", timeout=1.0)
            except (requests.ConnectionError, requests.Timeout):
                return False
            if r.status_code == 200:
                return True
            try:
                status = WorkerStatus.model_validate(r.json())
            except ValueError:  # not a worker's status (yet): keep asking
                return False
            if status.status == "failed":
                failed.append(status.failure())
                return True
            return False

        def exited(code: int) -> Exception:
            return TemporaryError(f"worker exited with code {code}: {self.failure_reason()}")

        if not self.wait_until(ready, timeout_s, poll_s=poll_s, on_exit=exited):
            self.stop(grace_s=2)
            raise TemporaryError(f"worker not ready within {timeout_s:.0f} s (log: {self.log_path})")
        if failed:
            self.stop(grace_s=2)
            raise failed[0]
        if self._liveness is None:
            self._liveness = Liveness(self.url, self.label)

    def status(self) -> WorkerStatus:
        return worker_status(self.url)

    def timeline(self) -> Timeline:
        return worker_timeline(self.url)

    def failure_reason(self) -> str:
        """The last error the worker logged (its JSON log lines), for the 503 message."""
        lines = self.log_tail(50).splitlines()
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


class Liveness:
    """Asks a ready worker's /livez every PROBE_EVERY_S in a daemon thread and remembers when it
    last answered (with any status: a failed worker answers; a deadlocked one does not)."""

    def __init__(self, url: str, label: str = "") -> None:
        self.url = url
        self.last_answer = time.monotonic()
        self._stop = threading.Event()
        threading.Thread(target=self._probe, name=f"liveness-{label}", daemon=True).start()

    def _probe(self) -> None:
        session = requests.Session()
        while not self._stop.wait(PROBE_EVERY_S):
            try:
                session.get(self.url + "/livez", timeout=PROBE_EVERY_S)
                self.last_answer = time.monotonic()
            except requests.RequestException:
                pass
        session.close()

    def silent_for(self) -> float:
        return time.monotonic() - self.last_answer

    def stop(self) -> None:
        self._stop.set()


def _stopped_by_signal(pid: int) -> bool:
    """Whether the process is in state T (stopped) or t (traced), from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:][:1] in ("T", "t")  # the name, in parentheses, may hold anything
