"""Tensors of a set of segments by name: zero-copy views that block until their bytes landed.

The reading half of every fetched tensor source: the runtime's view of loaderd's shared
memory (hydraserve.runtime.loader_files) and this process's own fetch into anonymous memory
(hydraserve.weights.fetched_source) both hand out tensors through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hydraserve.errors import TemporaryError, UnreachableError
from hydraserve.weights.segment import FLAG_READY, SegmentFailedError, SegmentReader
from hydraserve.weights.tensors import tensor_view

DEFAULT_WAIT_S = 600.0


class SegmentTensors:
    """``get(name)`` waits for the tensor's readiness byte, then views its bytes (no copy)."""

    def __init__(self, readers: list[SegmentReader], *, wait_timeout_s: float | None = DEFAULT_WAIT_S,
                 alive: Callable[[], bool] | None = None, describe_writer: str = "the fetch") -> None:
        self._readers = readers
        self._alive = alive  # is whoever fills the segments still there? (checked every second)
        self._writer = describe_writer
        self._where: dict[str, tuple[SegmentReader, int]] = {}
        for reader in readers:
            for i, entry in enumerate(reader.tensors):
                self._where[entry.name] = (reader, i)
        self.wait_timeout_s = wait_timeout_s

    def names(self) -> list[str]:
        return list(self._where)

    def ready(self, name: str) -> bool:
        reader, i = self._where[name]
        return reader.flag(i) == FLAG_READY

    def get(self, name: str, timeout_s: float | None = None) -> torch.Tensor:
        """The tensor once its bytes are in. KeyError for a name outside these segments;
        TemporaryError if its fetch failed, UnreachableError (one) if the writer went away;
        TimeoutError after ``timeout_s`` (default: the source's wait timeout)."""
        reader, i = self._where[name]
        if not self._readers:
            raise RuntimeError(f"tensor {name}: the source was closed before it was read")
        limit = self.wait_timeout_s if timeout_s is None else timeout_s
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            step = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                reader.wait_ready(i, timeout_s=step)
                break
            except SegmentFailedError as exc:
                raise TemporaryError(f"tensor {name}: {exc}", retry_after_s=1) from exc
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"tensor {name} not ready after {limit} s") from None
                if self._alive is not None and not self._alive():
                    raise UnreachableError(f"tensor {name}: {self._writer} stopped answering while its bytes "
                                           "were still arriving", retry_after_s=1) from None
        return tensor_view(reader.tensors[i], reader.view, reader.offsets[i])

    def close(self) -> None:
        for reader in self._readers:
            try:
                reader.close()
            except BufferError:
                pass  # tensors still reference the mapping; it goes when they do
        self._readers = []
