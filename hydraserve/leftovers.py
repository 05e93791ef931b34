"""What a worker leaves behind if it is killed, and who removes it.

A worker's temporary run directory (vLLM's IPC sockets, its model files) and the shared-memory
segments vLLM's processes create (``multiprocessing.shared_memory``: the engine's message
queues, 25-170 MB each) are removed by the worker when it stops. A worker SIGKILLed (a fault, the
OOM killer) never does it, and /dev/shm fills up. So each is written down, as it is made, in a
file its launcher names (``HYDRASERVE_LEFTOVERS_FILE``); the launcher removes what the file lists
once the worker has stopped, however it stopped. Only what a worker can make is removed: a run
directory of ours under the temporary directory, a segment name without a path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

LEFTOVERS_KEY = "HYDRASERVE_LEFTOVERS_FILE"
RUN_DIR_PREFIX = "hydraserve-worker-"
SHM_DIR = Path("/dev/shm")
_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def record(kind: Literal["dir", "shm"], value: str) -> None:
    """Write down something this process made, for its launcher (no-op without a file to write to)."""
    path = os.environ.get(LEFTOVERS_KEY)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{kind} {value}\n".encode())  # one short write: whole under O_APPEND
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not write down %s %s: %s", kind, value, exc)


def record_shared_memory() -> None:
    """Have every segment this process (and its forks) creates written down."""
    from multiprocessing import shared_memory

    original = shared_memory.SharedMemory.__init__
    if getattr(original, "_hydraserve_recorded", False):
        return

    def init(self: Any, name: str | None = None, create: bool = False, size: int = 0, **kwargs: Any) -> None:
        original(self, name, create, size, **kwargs)
        if create:
            record("shm", self.name.lstrip("/"))

    init._hydraserve_recorded = True  # type: ignore[attr-defined]
    shared_memory.SharedMemory.__init__ = init  # type: ignore[method-assign]


def remove_leftovers(listing: Path) -> list[str]:
    """Remove what ``listing`` names (what is gone already is skipped), then the listing; what
    was removed."""
    try:
        lines = listing.read_text().splitlines()
    except FileNotFoundError:
        return []
    removed = [line for line in lines if _remove(*line.partition(" ")[::2])]
    with contextlib.suppress(FileNotFoundError):
        listing.unlink()
    return removed


def _remove(kind: str, value: str) -> bool:
    if kind == "shm" and _SEGMENT.fullmatch(value):
        with contextlib.suppress(FileNotFoundError):
            (SHM_DIR / value).unlink()
            return True
        return False
    path = Path(value)
    if kind == "dir" and path.parent == Path(tempfile.gettempdir()) and path.name.startswith(RUN_DIR_PREFIX) \
            and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return True
    if kind not in ("dir", "shm"):
        log.warning("ignoring a leftover of unknown kind %r", kind)
    return False
