"""Keeps the embedded stack's loaderds alive and the placement's view of them true.

Every tick: a daemon that exited without being asked is started again on the same address (its
new process removes the dead one's segments and lock files before serving: loaderd's registry
does that at start); every ``reconcile_s``, and at once after a restart, each node is
re-registered with what its daemon holds (provider.residency), so a dead or restarted daemon's
models stop counting as cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hydraserve.contracts.plan import NodeInfo
from hydraserve.loaderd.daemon import DaemonProcess
from hydraserve.provider.residency import Registrar, reconcile_node

log = logging.getLogger(__name__)


@dataclass
class SupervisedDaemon:
    info: NodeInfo
    spawn: Callable[[], DaemonProcess]
    process: DaemonProcess
    restarts: int = 0


class LoaderdSupervisor:
    def __init__(self, daemons: list[SupervisedDaemon], placement: Registrar, *, interval_s: float = 1.0,
                 reconcile_s: float = 5.0) -> None:
        self.daemons = {d.info.name: d for d in daemons}
        self._placement = placement
        self._interval_s = interval_s
        self._reconcile_s = reconcile_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loaderd-supervisor", daemon=True)

    def start(self) -> LoaderdSupervisor:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        last_reconcile = time.monotonic()
        while not self._stop.wait(self._interval_s):
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
