"""When did this process start? (Linux /proc; falls back to the first import of this module.)

The cold-start timeline wants the moment the process existed, not when Python got around
to running our code; the difference (interpreter start-up) is part of the cold start.
"""

from __future__ import annotations

import os
import time

_FIRST_IMPORT = time.time()


def process_start_time() -> float:
    """Unix time at which the current process was created (10 ms resolution on Linux)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 (starttime), counted after the comm field
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")  # btime is whole seconds: too coarse
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError):
        return _FIRST_IMPORT
