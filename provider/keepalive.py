"""When to pre-warm a function and how long to keep it alive, from its own invocation history:
the hybrid histogram policy of "Serverless in the Wild" (Shahrad et al., ATC 2020, section 4.2).

Per function, the idle times between invocations (the end of one to the start of the next) go
into a histogram of ``bin_s`` bins over ``range_s`` (the paper: 1-minute bins over 4 hours).
When the histogram is representative, the pre-warm window is its head (the 5th percentile,
less a 10 % margin) and the keep-alive window reaches its tail (the 99th percentile, plus 10 %):
after an invocation the function may go to zero, is loaded again ``prewarm_s`` later, and is
kept until ``prewarm_s + keep_alive_s``. It is not representative, and the policy falls back:
- too little history (fewer than ``min_samples`` idle times): the fixed keep-alive;
- most idle times beyond the range (the paper predicts those with ARIMA; not done here): the
  fixed keep-alive;
- bin counts spread out (coefficient of variation under ``min_cv``: no pattern to exploit):
  no pre-warm, keep alive for the whole range (the paper's conservative choice).
Pure: the live gateway (activator/embedded/scaler.py) and the placement simulator
(provider/sim/engine.py) keep one ``InvocationHistory`` per function and act on its ``decision``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Reason = Literal["histogram", "too_little_history", "out_of_range", "no_pattern", "fixed"]


@dataclass(frozen=True)
class KeepAlive:
    """What to do after an invocation ends: go to zero, load again at ``prewarm_s`` (0: stay
    loaded), unload at ``prewarm_s + keep_alive_s``."""

    prewarm_s: float
    keep_alive_s: float
    reason: Reason

    @property
    def unload_at_s(self) -> float:
        return self.prewarm_s + self.keep_alive_s


@dataclass
class IdleHistogram:
    """The idle times of one function, binned."""

    bin_s: float = 60.0
    range_s: float = 4 * 3600.0
    counts: list[int] = field(default_factory=list)
    out_of_range: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * math.ceil(self.range_s / self.bin_s)

    def observe(self, idle_s: float) -> None:
        if idle_s < 0:
            raise ValueError(f"an idle time cannot be negative ({idle_s})")
        index = int(idle_s // self.bin_s)
        if index >= len(self.counts):
            self.out_of_range += 1
        else:
            self.counts[index] += 1

    @property
    def in_range(self) -> int:
        return sum(self.counts)

    def percentile_s(self, q: float) -> float:
        """The upper edge of the bin holding the q-th quantile of the in-range idle times."""
        target = q * self.in_range
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if count and seen >= target:
                return (index + 1) * self.bin_s
        return self.range_s

    def bin_cv(self) -> float:
        """Coefficient of variation of the bin counts (high: idle times concentrate in few bins)."""
        n = len(self.counts)
        mean = self.in_range / n
        if mean == 0:
            return 0.0
        variance = sum((c - mean) ** 2 for c in self.counts) / n
        return math.sqrt(variance) / mean


@dataclass(frozen=True)
class PolicySettings:
    fixed_keep_alive_s: float = 30.0  # the fallback (the platform's default idle timeout)
    min_samples: int = 10
    max_out_of_range: float = 0.5  # fraction of idle times beyond the range that makes it unusable
    min_cv: float = 2.0  # the paper's threshold for a representative histogram
    head_q: float = 0.05
    tail_q: float = 0.99
    margin: float = 0.10


def decide(hist: IdleHistogram, settings: PolicySettings = PolicySettings()) -> KeepAlive:
    """The pre-warm and keep-alive windows this history supports (or the fallback, and why)."""
    total = hist.in_range + hist.out_of_range
    if total < settings.min_samples:
        return KeepAlive(0.0, settings.fixed_keep_alive_s, "too_little_history")
    if hist.out_of_range / total > settings.max_out_of_range:
        return KeepAlive(0.0, settings.fixed_keep_alive_s, "out_of_range")
    if hist.bin_cv() < settings.min_cv:
        return KeepAlive(0.0, hist.range_s, "no_pattern")
    head = hist.percentile_s(settings.head_q) - hist.bin_s  # the bin's lower edge: load before it
    prewarm = max(0.0, head * (1 - settings.margin))
    tail = hist.percentile_s(settings.tail_q) * (1 + settings.margin)
    return KeepAlive(prewarm, max(hist.bin_s, tail - prewarm), "histogram")


def without_prewarm(decision: KeepAlive) -> KeepAlive:
    """Where nothing can be pre-warmed (no loaderd to fill): stay loaded to the window's end."""
    if decision.prewarm_s <= 0:
        return decision
    return KeepAlive(0.0, decision.unload_at_s, decision.reason)


def instance_keep_alive_s(decision: KeepAlive, function_idle: bool, fixed_s: float) -> float:
    """How long one idle instance stays: to the end of the window; not at all when the whole
    function is idle and will be pre-warmed before its next likely arrival; the fixed time while
    other requests of the function still run (an instance idle under load is not flapped)."""
    if decision.prewarm_s <= 0:
        return decision.keep_alive_s
    return 0.0 if function_idle else fixed_s


@dataclass
class InvocationHistory:
    """One function's idle times, fed as it turns busy (a request arrives with none in flight)
    and idle (its last request ended, none waiting)."""

    histogram: IdleHistogram = field(default_factory=IdleHistogram)
    settings: PolicySettings = field(default_factory=PolicySettings)
    idle_since: float | None = None

    def busy(self, now: float) -> None:
        if self.idle_since is not None:
            self.histogram.observe(max(0.0, now - self.idle_since))
            self.idle_since = None

    def idle(self, now: float) -> None:
        if self.idle_since is None:
            self.idle_since = now

    def decision(self) -> KeepAlive:
        return decide(self.histogram, self.settings)
