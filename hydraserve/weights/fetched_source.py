"""A TensorSource fetched by this process: the fetch engine filling anonymous-memory segments.

What a process without a loaderd uses for an s3:// model (the runtime's direct-S3 fallback,
``hydraserve generate``, the no-prefetch baseline): the same engine, segment layout and
per-tensor sha256 checks as the daemon, into private memory instead of /dev/shm. Fetching
starts at construction, first layers first; ``get(name)`` blocks until that tensor landed, so
a loader builds layer 0 while later layers are still downloading.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import torch

from hydraserve.errors import TemporaryError
from hydraserve.weights.fetch import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CONCURRENCY,
    DEFAULT_HEDGE_MIN_S,
    FetchEngine,
    Fill,
    NullObserver,
    RangeReader,
)
from hydraserve.weights.model_version import ModelVersion
from hydraserve.weights.segment import STATE_COMPLETE, STATE_FAILED, SegmentReader, SegmentWriter, plan_layout
from hydraserve.weights.segment_tensors import DEFAULT_WAIT_S, SegmentTensors

log = logging.getLogger(__name__)


class FetchedTensorSource:
    """Exactly ``names`` of ``version``, read from ``reader`` (the model's store)."""

    def __init__(self, version: ModelVersion, reader: RangeReader, names: Sequence[str], *,
                 concurrency: int | None = None, chunk_bytes: int | None = None,
                 hedge_min_s: float | None = DEFAULT_HEDGE_MIN_S,
                 wait_timeout_s: float | None = DEFAULT_WAIT_S) -> None:
        entries = version.select(names=names)
        self.via = reader.kind  # "s3": what the start-up timeline says the weights came through
        self._names = [e.name for e in entries]
        self.reads = 0  # ranged reads that delivered their bytes (hedges included)
        self._engine = FetchEngine(concurrency=concurrency or DEFAULT_CONCURRENCY,
                                   chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES, hedge_min_s=hedge_min_s,
                                   observer=_ReadCounter(self), name="direct-fetch")
        self._fills: list[Fill] = []
        self._errors: dict[str, BaseException] = {}  # group -> why its fetch failed
        self._group_of: dict[str, str] = {}
        self._done = threading.Event()
        self._lock = threading.Lock()
        orders, writers = [], []
        for order, group, members in version.groups(entries):
            self._group_of.update((m.name, group) for m in members)
            writer = SegmentWriter(plan_layout(version.key, group, members, version.tensor_sha256), None)
            orders.append(order)
            writers.append(writer)
            self._fills.append(Fill(writer.layout, writer, [reader], on_done=self._fill_done))
        self._writers = writers
        self._left = len(self._fills)
        if not self._fills:
            self._done.set()
        self._tensors = SegmentTensors([SegmentReader(buffer=w.buffer) for w in writers],
                                       wait_timeout_s=wait_timeout_s)
        self.total_bytes = sum(t.nbytes for t in entries)
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._engine.submit(list(zip(orders, self._fills, strict=True)))

    def _fill_done(self, fill: Fill, exc: BaseException | None) -> None:
        if exc is not None:
            self._errors[fill.layout.group] = exc
            log.error("direct fetch of %s failed: %s", fill.layout.group, exc)
        fill.writer.set_state(STATE_FAILED if exc is not None else STATE_COMPLETE)
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.finished_at = time.monotonic()
            self._done.set()
            self._engine.close(wait_s=0.0)  # every byte is here: the fetch threads can go

    @property
    def bytes_fetched(self) -> int:
        return sum(f.bytes_done for f in self._fills)

    def tensor_names(self) -> list[str]:
        """The tensors this source fetches, in streaming order."""
        return list(self._names)

    def ready(self, name: str) -> bool:
        return self._tensors.ready(name)

    def get(self, name: str, timeout: float | None = None) -> torch.Tensor:
        """The tensor (a view of its segment); blocks until its bytes arrived. KeyError for a
        name outside this source; the fetch's own error (StorageError naming the object, ...)
        if it failed; TimeoutError."""
        try:
            return self._tensors.get(name, timeout)
        except TemporaryError:
            cause = self._errors.get(self._group_of[name])
            if cause is not None:
                raise cause from None
            raise

    def wait_all(self, timeout: float | None = None) -> None:
        """Block until every segment is filled; raises TimeoutError, or the first failure."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"fetch not finished within {timeout} s")
        for name in self._names:
            self._tensors.get(name, 0)

    def close(self) -> None:
        """Stop fetching (sources stop retrying); a tensor that had not arrived fails, never hangs."""
        self._engine.close(wait_s=1.0)
        for writer in self._writers:
            if writer.state != STATE_COMPLETE:
                writer.set_state(STATE_FAILED)  # wakes readers still waiting
        self._tensors.close()
        for writer in self._writers:
            writer.close()


class _ReadCounter(NullObserver):
    """FetchObserver of one source: counts the reads that delivered their bytes."""

    def __init__(self, source: FetchedTensorSource) -> None:
        self._source = source
        self._lock = threading.Lock()

    def on_bytes(self, kind: str, n: int) -> None:
        with self._lock:
            self._source.reads += 1
