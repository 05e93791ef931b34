"""A worker's lifecycle as its routes see it: starting, ready, failed or draining; requests in flight.

Created by the worker (hydraserve.runtime.serving.worker) before anything slow starts, so the
front (hydraserve.runtime.serving.front) answers health probes while vLLM imports and the
weights arrive; requests that come early wait (bounded) for readiness instead of failing. All
methods run on the worker's event loop.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import WorkerState, WorkerStatus
from hydraserve.errors import HydraError, InstanceFailedError, TemporaryError

S = TypeVar("S")


class ServingState(Generic[S]):
    """What serves (``S``: the head's vLLM server) once it does, and the worker's flags."""

    def __init__(self, function_name: str = "", revision: str = "") -> None:
        self.function_name = function_name
        self.revision = revision
        self.timeline = Timeline()
        self._serving: S | None = None
        self._settled = asyncio.Event()  # serving or failed: waiters stop waiting
        self._failed: str | None = None
        self._failed_with: HydraError | None = None
        self._draining = False
        self.consolidated = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def set_serving(self, serving: S) -> None:
        self._serving = serving
        self._settled.set()

    def set_failed(self, reason: str, error: BaseException | None = None) -> None:
        """Failed for good; ``error`` (when it is a HydraError) names its class in the status."""
        if self._failed is None:
            self._failed = reason
            self._failed_with = error if isinstance(error, HydraError) else None
        self._settled.set()

    def mark_consolidated(self) -> None:
        self.consolidated = True

    def start_draining(self) -> None:
        self._draining = True

    @property
    def failed_reason(self) -> str | None:
        return self._failed

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def is_ready(self) -> bool:
        return self._serving is not None and self._failed is None and not self._draining

    @property
    def serving_or_none(self) -> S | None:
        return self._serving

    def status(self) -> WorkerStatus:
        state: WorkerState = ("failed" if self._failed else "draining" if self._draining
                              else "ready" if self._serving is not None else "starting")
        error = self._failed_with
        return WorkerStatus(status=state, reason=self._failed, inflight=self._inflight, function=self.function_name,
                            revision=self.revision, consolidated=self.consolidated,
                            error_type=error.error_type if error else None, error_code=error.code if error else None)

    async def serving(self, wait_s: float) -> S:
        """What serves, waiting up to ``wait_s`` for start-up; a retryable 503 if it does not come."""
        if self._draining:
            raise TemporaryError("worker is shutting down", retry_after_s=1.0)
        try:
            await asyncio.wait_for(self._settled.wait(), wait_s)
        except TimeoutError:
            raise TemporaryError(f"worker not ready after {wait_s:.0f} s", retry_after_s=1.0) from None
        if self._failed is not None:
            raise InstanceFailedError(f"worker failed: {self._failed}", retry_after_s=1.0)
        assert self._serving is not None
        return self._serving

    def enter(self) -> None:
        self._inflight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no request is in flight (True) or ``timeout_s`` passes (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False
