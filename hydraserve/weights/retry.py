"""The retry policy of S3 requests: exponential backoff with full jitter inside one time budget.

Applied by hydraserve.weights.s3.S3Client, the only layer that retries S3 (no caller wraps it
in retries of its own), so ``budget_s`` bounds how long a dead store can hold up a cold start.
No boto3 here: commands read the defaults without importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_BUDGET_S = 15.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by total time."""

    max_attempts: int = 50  # a secondary cap: the time budget is what ends retries
    base_delay_s: float = 0.1
    max_delay_s: float = 2.0
    budget_s: float = DEFAULT_BUDGET_S

    def delay(self, attempt: int, rand: float) -> float:
        """Sleep before retry number ``attempt`` (1-based); ``rand`` in [0, 1)."""
        return rand * min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
