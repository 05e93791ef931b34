"""Keeps the embedded stack's loaderds and warm pools alive and the placement's view true.

Every tick: a daemon that exited without being asked is started again on the same address (its
new process removes the dead one's segments and lock files before serving: loaderd's registry
does that at start); every ``reconcile_s``, and at once after a restart, each node is
re-registered with what its daemon holds (provider.residency), so a dead or restarted daemon's
models stop counting as cache. A node's warm pool (fork server) that exited without being asked
is started again on the same socket (issue 22 item 8: a killed one was never restarted, and every
later cold start on its node spawned instead of adopting); its idle children exited with it
(their end of its socket pair read EOF). The embedded S3, if it exited unasked, is started again
on the same port with the same keys and objects (issue 22 item 6: its death was permanent, and
even models loaderd had cached failed their next cold start).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from hydraserve.contracts.plan import NodeInfo
from hydraserve.embedded.s3 import EmbeddedS3
from hydraserve.loaderd.daemon import DaemonProcess
from hydraserve.processes import ChildProcess
from hydraserve.provider.residency import Registrar, reconcile_node

log = logging.getLogger(__name__)


P = TypeVar("P", bound=ChildProcess)


@dataclass
class Supervised(Generic[P]):
    """A child the stack keeps running: how to start it, the process running now, its restarts."""

    name: str  # what the log calls it
    spawn: Callable[[], P]
    process: P
    restarts: int = 0

    def restart(self) -> bool:
        """Start it again after it exited unasked (False: it did not start; the next tick tries again)."""
        log.warning("%s exited (code %s): starting it again", self.name, self.process.proc.poll())
        try:
            self.process = self.spawn()
        except Exception as exc:
            log.error("%s did not start again: %s (the next tick tries again)", self.name, exc)
            return False
        self.restarts += 1
        return True


@dataclass
class SupervisedDaemon(Supervised[DaemonProcess]):
    info: NodeInfo = field(kw_only=True)


@dataclass
class SupervisedPool(Supervised[ChildProcess]):
    node: str = field(kw_only=True)


class StackSupervisor:
    def __init__(self, daemons: list[SupervisedDaemon], placement: Registrar, *, pools: Sequence[SupervisedPool] = (),
                 s3: EmbeddedS3 | None = None, interval_s: float = 1.0, reconcile_s: float = 5.0) -> None:
        self.daemons = {d.info.name: d for d in daemons}
        self.pools = {p.node: p for p in pools}
        self.s3 = s3
        self.s3_restarts = 0
        self._placement = placement
        self._interval_s = interval_s
        self._reconcile_s = reconcile_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-supervisor", daemon=True)

    def start(self) -> StackSupervisor:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        last_reconcile = time.monotonic()
        while not self._stop.wait(self._interval_s):
            self._keep_s3()
            for pool in self.pools.values():
                if pool.process.lost():
                    pool.restart()
            restarted = [d for d in self.daemons.values() if d.process.lost() and d.restart()]
            due = time.monotonic() - last_reconcile >= self._reconcile_s
            for daemon in self.daemons.values() if due else restarted:
                try:
                    reconcile_node(self._placement, daemon.info, daemon.process.client())
                except Exception as exc:  # placement away: next tick
                    log.warning("could not reconcile %s: %s", daemon.info.name, exc)
            if due:
                last_reconcile = time.monotonic()

    def _keep_s3(self) -> None:
        if self.s3 is None or not self.s3.lost():
            return
        log.warning("the embedded S3 exited: starting it again on %s", self.s3.endpoint_url)
        try:
            self.s3.start()
        except Exception as exc:
            log.error("the embedded S3 did not start again: %s (the next tick tries again)", exc)
            return
        self.s3_restarts += 1
