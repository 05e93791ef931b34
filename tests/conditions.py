"""Waiting for a condition instead of sleeping a guessed time (tests)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(check: Callable[[], object], timeout_s: float = 10.0, poll_s: float = 0.05) -> bool:
    """True as soon as ``check()`` is truthy, False once ``timeout_s`` passed without it."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
