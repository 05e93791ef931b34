"""Keeps the embedded stack's loaderds and warm pools alive and the placement's view true.

Every tick: a daemon that exited without being asked is started again on the same address (its
new process removes the dead one's segments and lock files before serving: loaderd's registry
does that at start); every ``reconcile_s``, and at once after a restart, each node is
re-registered with what its daemon holds (provider.residency), so a dead or restarted daemon's
models stop counting as cache. A node's warm pool (fork server) that exited without being asked
is started again on the same socket (issue 22 item 8: a killed one was never restarted, and every
later cold start on its node spawned instead of adopting); its idle children exited with it
(their end of its socket pair read EOF).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hydraserve.contracts.plan import NodeInfo
from hydraserve.loaderd.daemon import DaemonProcess
from hydraserve.processes import ChildProcess
from hydraserve.provider.residency import Registrar, reconcile_node

log = logging.getLogger(__name__)


@dataclass
class SupervisedDaemon:
    info: NodeInfo
    spawn: Callable[[], DaemonProcess]
    process: DaemonProcess
    restarts: int = 0


@dataclass
class SupervisedPool:
    node: str
    spawn: Callable[[], ChildProcess]
    process: ChildProcess
    restarts: int = 0


class StackSupervisor:
    def __init__(self, daemons: list[SupervisedDaemon], placement: Registrar, *, pools: Sequence[SupervisedPool] = (),
                 interval_s: float = 1.0, reconcile_s: float = 5.0) -> None:
        self.daemons = {d.info.name: d for d in daemons}
        self.pools = {p.node: p for p in pools}
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
            for pool in self.pools.values():
                if pool.process.lost():
                    self._restart_pool(pool)
            restarted = [d for d in self.daemons.values() if d.process.lost() and self._restart(d)]
            due = time.monotonic() - last_reconcile >= self._reconcile_s
            for daemon in self.daemons.values() if due else restarted:
                try:
                    reconcile_node(self._placement, daemon.info, daemon.process.client())
                except Exception as exc:  # placement away: next tick
                    log.warning("could not reconcile %s: %s", daemon.info.name, exc)
            if due:
                last_reconcile = time.monotonic()

    def _restart(self, daemon: SupervisedDaemon) -> bool:
        code = daemon.process.proc.returncode
        log.warning("loaderd of %s exited (code %s): starting it again", daemon.info.name, code)
        try:
            daemon.process = daemon.spawn()
        except Exception as exc:
            log.error("loaderd of %s did not start again: %s (next try in %.0f s)", daemon.info.name, exc,
                      self._interval_s)
            return False
        daemon.restarts += 1
        return True

    def _restart_pool(self, pool: SupervisedPool) -> None:
        log.warning("the warm pool of %s exited (code %s): starting it again", pool.node,
                    pool.process.proc.poll())
        try:
            pool.process = pool.spawn()
        except Exception as exc:
            log.error("the warm pool of %s did not start again: %s", pool.node, exc)
            return
        pool.restarts += 1
