"""Waiting for a condition instead of sleeping a guessed time (tests)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


def wait_for(check: Callable[[], object], timeout_s: float = 10.0, poll_s: float = 0.05) -> bool:
    """True as soon as ``check()`` is truthy, False once ``timeout_s`` passed without it."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def running(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` still running (a zombie has exited: only its parent's wait is missing)."""
    import psutil

    wanted = set(pids)
    return [p.info["pid"] for p in psutil.process_iter(["pid", "status"])
            if p.info["pid"] in wanted and p.info["status"] != psutil.STATUS_ZOMBIE]
