"""Per-function scale-from-zero state machine: buffer at zero, start once, route, idle to zero.

The gateway calls ``acquire`` for every request: at zero it starts one cold start (in a
thread) and the request waits in a bounded queue until the instance is ready or its deadline
passes; a failed start wakes every waiter with the reason (503) and leaves the function at
zero, so the next request tries again. A start that lost a worker is tried again at once on a
plan avoiding that node (up to ``max_start_attempts``), the waiters still waiting. An instance
that fails while serving (``instance_failed``: the gateway saw it, or the reaper found a
worker lost) is failed in the backend and the function goes back to zero, its next start
avoiding the lost nodes. ``scale_down_if_idle`` takes ``now`` so the reaper and tests decide
with an injected clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import StrEnum

from hydraserve.activator.functions import FunctionConfig
from hydraserve.activator.ports import Endpoint, FunctionBackend
from hydraserve.contracts.timeline import Timeline
from hydraserve.errors import HydraError, InstanceFailedError, OverloadedError, TemporaryError

log = logging.getLogger(__name__)


class ScaleState(StrEnum):
    ZERO = "zero"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


class FunctionScaler:
    """Scaling state of one function; thread-safe."""

    def __init__(self, config: FunctionConfig, backend: FunctionBackend,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._backend = backend
        self._clock = clock
        self._cond = threading.Condition()
        self.state = ScaleState.ZERO
        self.endpoint: Endpoint | None = None
        self._waiting = 0
        self._inflight = 0
        self._last_active = clock()
        self._attempt = 0
        self._failed_attempt = 0
        self.last_failure: str | None = None
        self.cold_starts = 0
        self.last_timeline: Timeline | None = None
        self._first_response_pending = False
        self._closed = False
        self._avoid_next: tuple[str, ...] = ()  # nodes the next cold start avoids (lost workers)
        self.instance_failures = 0

    # request path ------------------------------------------------------------------------
    def acquire(self) -> Endpoint:
        """An endpoint for one request (blocking through a cold start); pair with release()."""
        with self._cond:
            if self.state == ScaleState.READY and self.endpoint is not None:
                return self._take()
            if self._waiting >= self.config.max_queue:
                raise OverloadedError(f"function {self.config.name}: {self._waiting} requests already "
                                      "waiting for a cold start", retry_after_s=1.0)
            self._waiting += 1
            try:
                if self.state == ScaleState.ZERO:
                    self._begin_start()
                attempt = self._attempt
                deadline = self._clock() + self.config.request_timeout_s
                while not (self.state == ScaleState.READY and self.endpoint is not None):
                    if self._failed_attempt >= attempt:
                        raise TemporaryError(f"function {self.config.name} failed to start: "
                                             f"{self.last_failure}", retry_after_s=1.0)
                    if self.state == ScaleState.ZERO:  # stopped while we waited: start again
                        self._begin_start()
                        attempt = self._attempt
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        raise OverloadedError(f"function {self.config.name}: not ready within "
                                              f"{self.config.request_timeout_s:.0f} s", retry_after_s=1.0)
                    self._cond.wait(min(remaining, 1.0))
                return self._take()
            finally:
                self._waiting -= 1

    def release(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._last_active = self._clock()
            self._cond.notify_all()

    def first_response(self) -> None:
        """The proxy saw the first response byte after a cold start: close the timeline."""
        with self._cond:
            if self._first_response_pending and self.last_timeline is not None:
                self.last_timeline.mark("first_response_byte", component="gateway")
                self._first_response_pending = False

    def _take(self) -> Endpoint:
        assert self.endpoint is not None
        self._inflight += 1
        self._last_active = self._clock()
        return self.endpoint

    # cold start --------------------------------------------------------------------------
    def _begin_start(self) -> None:
        self._attempt += 1
        self.state = ScaleState.STARTING
        timeline = Timeline()
        timeline.mark("request_received", component="gateway")
        self.last_timeline = timeline
        avoid, self._avoid_next = self._avoid_next, ()
        threading.Thread(target=self._cold_start, args=(self._attempt, timeline, avoid),
                         name=f"cold-start-{self.config.name}", daemon=True).start()

    def _start_avoiding_lost_nodes(self, timeline: Timeline, avoid: tuple[str, ...]) -> Endpoint:
        """backend.start, tried again on a fresh plan while attempts lose workers."""
        for attempt in range(1, self.config.max_start_attempts + 1):
            try:
                return self._backend.start(self.config, timeline, avoid)
            except InstanceFailedError as exc:
                if not exc.nodes or attempt == self.config.max_start_attempts or self._closed:
                    raise
                avoid = tuple(dict.fromkeys((*avoid, *exc.nodes)))
                log.warning("cold start of %s lost a worker, starting again without %s: %s",
                            self.config.name, ", ".join(avoid), exc.message)
                timeline.mark("cold_start_retry", component="gateway", avoid=list(avoid), reason=exc.message[:200])
        raise AssertionError("unreachable")

    def _cold_start(self, attempt: int, timeline: Timeline, avoid: tuple[str, ...]) -> None:
        try:
            endpoint = self._start_avoiding_lost_nodes(timeline, avoid)
        except Exception as exc:  # any failure must wake the waiters
            reason = exc.message if isinstance(exc, HydraError) else f"{type(exc).__name__}: {exc}"
            log.warning("cold start of %s failed: %s", self.config.name, reason)
            with self._cond:
                self.state = ScaleState.ZERO
                self.last_failure = reason
                self._failed_attempt = attempt
                self._cond.notify_all()
            return
        timeline.mark("instance_ready", component="gateway")
        with self._cond:
            if self._closed:  # gateway shut down while we were starting
                self.state = ScaleState.ZERO
                self._cond.notify_all()
                closed = True
            else:
                closed = False
        if closed:
            self._backend.stop(self.config.name, endpoint.instance_id)
            return
        with self._cond:
            self.endpoint = endpoint
            self.state = ScaleState.READY
            self.cold_starts += 1
            self.last_failure = None
            self._first_response_pending = True
            self._last_active = self._clock()
            self._cond.notify_all()

    # failures while serving ---------------------------------------------------------------
    def instance_failed(self, endpoint: Endpoint, reason: str) -> bool:
        """``endpoint``'s instance cannot serve: fail it in the backend (its lost nodes are
        avoided by the next start) and go back to zero. True if this call did it (the first
        of several requests that saw the same failure)."""
        with self._cond:
            current = self.endpoint is not None and self.endpoint.instance_id == endpoint.instance_id
            if not (current and self.state == ScaleState.READY):
                return False
            self.endpoint = None
            self.state = ScaleState.STOPPING
            self.instance_failures += 1
            self.last_failure = reason
        log.warning("instance %s of %s failed: %s", endpoint.instance_id, self.config.name, reason)
        lost: tuple[str, ...] = ()
        try:
            lost = self._backend.fail(self.config.name, endpoint.instance_id, reason)
        finally:
            with self._cond:
                self._avoid_next = lost
                self.state = ScaleState.ZERO
                self._cond.notify_all()
        return True

    def check_instance(self) -> bool:
        """Reaper tick: fail the instance if the backend lost one of its workers."""
        with self._cond:
            endpoint = self.endpoint if self.state == ScaleState.READY else None
        if endpoint is None:
            return False
        lost = self._backend.lost_nodes(endpoint.instance_id)
        return bool(lost) and self.instance_failed(endpoint, f"worker lost on {', '.join(lost)}")

    # scale to zero -----------------------------------------------------------------------
    def scale_down_if_idle(self, now: float) -> bool:
        """Stop the instance if nothing ran or waited for idle_timeout_s; True if it did."""
        with self._cond:
            idle = (self.state == ScaleState.READY and self._inflight == 0 and self._waiting == 0
                    and now - self._last_active >= self.config.idle_timeout_s)
            if not idle:
                return False
            endpoint, self.endpoint = self.endpoint, None
            self.state = ScaleState.STOPPING
        assert endpoint is not None
        log.info("function %s idle for %.0f s: scaling to zero", self.config.name, self.config.idle_timeout_s)
        try:
            self._backend.stop(self.config.name, endpoint.instance_id)
        finally:
            with self._cond:
                self.state = ScaleState.ZERO
                self._cond.notify_all()
        return True

    def shutdown(self) -> None:
        """Stop any running instance now (gateway exit)."""
        with self._cond:
            self._closed = True
            endpoint, self.endpoint = self.endpoint, None
            self.state = ScaleState.ZERO
            self._cond.notify_all()
        if endpoint is not None:
            self._backend.stop(self.config.name, endpoint.instance_id)

    def status(self) -> dict[str, object]:
        with self._cond:
            return {"name": self.config.name, "state": self.state.value, "inflight": self._inflight,
                    "waiting": self._waiting, "cold_starts": self.cold_starts,
                    "instance_failures": self.instance_failures, "last_failure": self.last_failure,
                    "endpoint": self.endpoint.url if self.endpoint else None}
