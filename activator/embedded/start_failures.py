"""What a function's failed cold starts decide: how long before the next may begin, and whether
the function failed for good.

A start that fails for a reason a retry may fix (a crash, a timeout) backs off: the next start
waits BACKOFF_FIRST_S, doubling per consecutive failure up to BACKOFF_MAX_S (real seconds, on the
loop, so a test's frozen clock cannot hold it forever). One that fails for a reason no retry fixes
(``hydraserve.errors.fails_every_start``) fails the function until it changes: its settings
(``clear``), or its model, whose fingerprint (recorded when it failed) is compared at most every
MODEL_RECHECK_S. The scaler owns the requests; this owns the decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from hydraserve.activator.embedded.metrics import GatewayMetrics
from hydraserve.errors import FunctionFailedError

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0  # after a failed start, the next waits this long, doubling per failure
BACKOFF_MAX_S = 60.0
MODEL_RECHECK_S = 5.0  # a failed function asks whether its model changed at most this often


@dataclass(frozen=True)
class StartFailure:
    """Why the function cannot start until it or its model changes, and which model it failed on."""

    reason: str
    error_type: str
    model_fingerprint: str | None  # None: unknown (the next check counts any answer as a change)
    at: float


class StartFailures:
    """One function's: consecutive failures, the backoff under way, the failure for good."""

    def __init__(self, function: str, metrics: GatewayMetrics, clock: Callable[[], float],
                 resume: Callable[[], None]) -> None:
        self._function = function
        self._metrics = metrics
        self._clock = clock
        self._resume = resume  # called when a backoff ends: demand may start one again
        self.failed: StartFailure | None = None
        self.count = 0  # consecutive failed starts: the backoff's exponent
        self._timer: asyncio.TimerHandle | None = None
        self._ends = 0.0  # on the injected clock, for status
        self._next_check = 0.0

    @property
    def holding(self) -> bool:
        """No start may begin now (failed for good, or backing off)."""
        return self.failed is not None or self._timer is not None

    def failed_once(self) -> float:
        """A start failed: back off (seconds until the next may begin, returned)."""
        self.count += 1
        delay_s = min(BACKOFF_FIRST_S * 2 ** (self.count - 1), BACKOFF_MAX_S)
        self.cancel()
        self._ends = self._clock() + delay_s
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._backoff_over)
        return delay_s

    def succeeded(self) -> None:
        self.count = 0

    def fail_for_good(self, reason: str, error_type: str) -> StartFailure:
        self.failed = StartFailure(reason, error_type, None, self._clock())
        self._metrics.failed_functions.labels(self._function).set(1)
        log.error("function %s failed: %s (not started again until it or its model changes)", self._function, reason)
        return self.failed

    def failed_on(self, failure: StartFailure, fingerprint: str | None) -> None:
        """The fingerprint of the model ``failure`` happened on (asked after it)."""
        if self.failed is failure:
            self.failed = StartFailure(failure.reason, failure.error_type, fingerprint, failure.at)
            self._next_check = self._clock() + MODEL_RECHECK_S

    def check_due(self) -> bool:
        """Whether to ask the model's fingerprint now (at most every MODEL_RECHECK_S)."""
        now = self._clock()
        if self.failed is None or now < self._next_check:
            return False
        self._next_check = now + MODEL_RECHECK_S
        return True

    def model_is(self, fingerprint: str | None) -> None:
        """The model's fingerprint now: a failed function whose model changed may start again."""
        if self.failed is not None and fingerprint is not None and fingerprint != self.failed.model_fingerprint:
            log.info("the model of failed function %s changed: it may start again", self._function)
            self.clear()

    def clear(self) -> None:
        """The function or its model changed: the next request starts it at once."""
        if self.failed is not None:
            self._metrics.failed_functions.labels(self._function).set(0)
        self.failed = None
        self.count = 0
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def error(self, model_uri: str) -> FunctionFailedError:
        assert self.failed is not None
        name = self._function
        return FunctionFailedError(
            f"function {name} failed to start and is not started again until it or its model changes: "
            f"{self.failed.reason}. Fix the model and push it again (hydraserve model push DIR {model_uri}) "
            f"or change the function (hydraserve fn update {name} ...)", param="function")

    def status(self) -> dict[str, object]:
        return {"failed": None if self.failed is None else {"reason": self.failed.reason,
                                                            "error_type": self.failed.error_type},
                "start_failures": self.count,
                "next_start_in_s": round(max(0.0, self._ends - self._clock()), 3) if self._timer else 0.0}

    def _backoff_over(self) -> None:
        self._timer = None
        self._resume()
