"""Runtime state shared by the routes: the engine once loaded, readiness, draining, timeline.

The worker creates it before anything slow starts, so the HTTP server can answer health
probes while libraries import and weights load; requests that arrive early wait (bounded)
for readiness instead of failing.
"""

from __future__ import annotations

import threading

from hydraserve.contracts.timeline import Timeline
from hydraserve.errors import HydraError, InstanceFailedError, TemporaryError
from hydraserve.runtime.server.ports import ServingEngine


class RuntimeState:
    """Mutable, thread-safe holder of the engine and the worker's lifecycle flags."""

    def __init__(self, function_name: str = "", revision: str = "") -> None:
        self.function_name = function_name
        self.revision = revision
        self.timeline = Timeline()
        self._engine: ServingEngine | None = None
        self.stage_runner: object | None = None  # an inner stage serves its layers, not the API
        self._serving = False
        self.consolidated = False  # a group's head that became the whole model
        self._ready = threading.Event()
        self._failed: str | None = None
        self._failed_with: HydraError | None = None
        self._draining = False
        self._inflight = 0
        self._idle = threading.Condition()

    # lifecycle -------------------------------------------------------------------------
    def set_engine(self, engine: ServingEngine) -> None:
        """The head's engine is up: the API can serve."""
        self._engine = engine
        self._serving = True
        self._ready.set()

    def set_stage(self, runner: object) -> None:
        """An inner stage's layers and KV cache are up (it serves the group, not the API)."""
        self.stage_runner = runner
        self._serving = True
        self._ready.set()

    def mark_consolidated(self) -> None:
        self.consolidated = True

    def set_failed(self, reason: str, error: BaseException | None = None) -> None:
        """Failed for good; ``error`` (when it is a HydraError) names its class in the status."""
        self._failed = reason
        self._failed_with = error if isinstance(error, HydraError) else None
        self._ready.set()  # wake waiters so they fail fast

    def start_draining(self) -> None:
        self._draining = True

    @property
    def failed_reason(self) -> str | None:
        return self._failed

    @property
    def is_ready(self) -> bool:
        return self._serving and self._failed is None and not self._draining

    @property
    def is_draining(self) -> bool:
        return self._draining

    def status(self) -> dict[str, object]:
        state = ("failed" if self._failed else "draining" if self._draining
                 else "ready" if self._serving else "starting")
        error = self._failed_with
        return {"status": state, "reason": self._failed, "inflight": self._inflight,
                "function": self.function_name, "revision": self.revision, "consolidated": self.consolidated,
                "error_type": error.error_type if error else None, "error_code": error.code if error else None}

    def engine_or_none(self) -> ServingEngine | None:
        return self._engine

    def engine(self, wait_s: float) -> ServingEngine:
        """The engine, waiting up to ``wait_s`` for start-up; 503 if it does not come."""
        if self._draining:
            raise TemporaryError("worker is shutting down", retry_after_s=1.0)
        self._ready.wait(wait_s)
        if self._failed:
            raise InstanceFailedError(f"worker failed: {self._failed}", retry_after_s=1.0)
        if self._engine is None:
            raise TemporaryError(f"worker not ready after {wait_s:.0f} s", retry_after_s=1.0)
        return self._engine

    # in-flight accounting for SIGTERM drain ---------------------------------------------
    def enter(self) -> None:
        with self._idle:
            self._inflight += 1

    def leave(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no request is in flight (True) or ``timeout`` passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)
