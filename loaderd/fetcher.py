"""The fetch engine: many concurrent ranged reads into segments, first layers first.

Used by hydraserve.loaderd.service (the daemon) and by hydraserve.runtime.shm_source (the
runtime's fallback when no daemon answers fills an anonymous-memory segment with the same code).
Each segment's runs are cut into chunks (its bytes striped over all streams, at most
``chunk_bytes``, at least ``min_chunk_bytes``); a fixed pool of worker threads
takes chunks from one priority queue ordered by (group order, request, offset), so the first
layers of every cold start on the node land first. A tensor is published the moment its last
chunk is written. Sources are tried in order (peers first, S3 last); a failing peer is skipped
for the rest of that segment; S3 failures are retried with backoff and jitter within a budget.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from hydraserve.errors import HydraError, IntegrityError, PermanentError
from hydraserve.loaderd.segment import SegmentLayout, SegmentWriter

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 8 << 20
DEFAULT_CONCURRENCY = 8  # best first-layer time on the emulated node; real S3 wants ~32 (Run:ai)
DEFAULT_MIN_CHUNK_BYTES = 1 << 20
# Measured on a 400 Mbit emulated node (hydraserve bench loader): striping each group into
# 3 chunks per stream and hedging a chunk at 1.5x its siblings' median time gave the earliest
# first layer; 1 chunk per stream let one slow TCP flow hold every layer back to the end.
STRIPES_PER_STREAM = 3
HEDGE_FACTOR = 1.5


class RangeReader(Protocol):
    """Reads [start, end) of a model file. ``kind`` is "s3" or "peer" (metrics, fallback)."""

    kind: str
    label: str

    def read(self, file: str, start: int, end: int) -> bytes: ...


class FetchObserver(Protocol):
    """What the engine reports (the daemon's Prometheus metrics implement it)."""

    def on_bytes(self, kind: str, n: int) -> None: ...
    def on_error(self, kind: str, error: str) -> None: ...
    def on_inflight(self, delta: int) -> None: ...
    def on_hedge(self, outcome: str) -> None: ...


class _NullObserver:
    def on_bytes(self, kind: str, n: int) -> None: ...
    def on_error(self, kind: str, error: str) -> None: ...
    def on_inflight(self, delta: int) -> None: ...
    def on_hedge(self, outcome: str) -> None: ...


@dataclass
class Fill:
    """One segment being filled: per-tensor chunk counts and the completion callback."""

    layout: SegmentLayout
    writer: SegmentWriter
    sources: list[RangeReader]
    on_done: Callable[[Fill, BaseException | None], None]
    on_tensor: Callable[[Fill, int], None] | None = None
    defer_publish: bool = False  # the owner publishes readiness itself (after verification)
    pending: list[int] = field(default_factory=list)
    chunks_left: int = 0
    failed: bool = False
    bad_sources: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    bytes_done: int = 0
    tensors_done: int = 0
    chunks_total: int = 0
    done_chunks: set[int] = field(default_factory=set)
    durations: list[float] = field(default_factory=list)  # seconds of each chunk read so far
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Chunk:
    fill: Fill
    file: str
    start: int
    end: int
    offset: int
    tensors: tuple[int, ...]
    seq: int
    priority: tuple[int, int, int] = (0, 0, 0)


@dataclass
class _Running:
    chunk: _Chunk
    started: float
    hedged: bool = False


class FetchEngine:
    """A pool of fetch threads shared by every segment of the node (or of one fallback reader)."""

    def __init__(self, *, concurrency: int = DEFAULT_CONCURRENCY,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES,
                 retry_budget_s: float = 60.0, hedge_min_s: float | None = 0.25,
                 observer: FetchObserver | None = None, name: str = "fetch") -> None:
        if concurrency < 1 or chunk_bytes < 4096:
            raise ValueError("concurrency >= 1 and chunk_bytes >= 4096 required")
        self.chunk_bytes = chunk_bytes
        self.min_chunk_bytes = min(min_chunk_bytes, chunk_bytes)
        self.concurrency = concurrency
        self.retry_budget_s = retry_budget_s
        self.hedge_min_s = hedge_min_s  # None: never hedge
        self.hedges = 0
        self._running: dict[int, _Running] = {}
        self.observer: FetchObserver = observer or _NullObserver()
        self._heap: list[tuple[tuple[int, int, int], int, _Chunk]] = []
        self._seq = itertools.count()
        self._request_seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.inflight = 0
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(concurrency)]
        for t in self._threads:
            t.start()

    def submit(self, fills: list[tuple[int, Fill]]) -> None:
        """Queue segments (with their group order) of one request; returns at once."""
        request = next(self._request_seq)
        jobs: list[tuple[tuple[int, int, int], int, _Chunk]] = []
        for order, fill in fills:
            chunks = self._chunks(fill, (order, request))
            fill.pending = [0] * len(fill.layout.tensors)
            for chunk in chunks:
                for i in chunk.tensors:
                    fill.pending[i] += 1
            fill.chunks_left = fill.chunks_total = len(chunks)
            for i, count in enumerate(fill.pending):
                if count == 0:  # empty tensor: nothing to fetch
                    self._publish(fill, i)
            if not chunks:
                fill.on_done(fill, None)
                continue
            jobs.extend((c.priority, c.seq, c) for c in chunks)
        with self._cv:
            for job in jobs:
                heapq.heappush(self._heap, job)
            self._cv.notify_all()

    def chunk_size(self, group_bytes: int) -> int:
        """Bytes per ranged read for a group: the group striped over every stream (so its chunks
        run side by side and finish together, with no slow last chunk sharing the link with the
        next group's), between ``min_chunk_bytes`` and ``chunk_bytes``."""
        striped = -(-group_bytes // (self.concurrency * STRIPES_PER_STREAM))
        striped = -(-striped // 65536) * 65536
        return max(self.min_chunk_bytes, min(self.chunk_bytes, striped))

    def _chunks(self, fill: Fill, rank: tuple[int, int]) -> list[_Chunk]:
        out: list[_Chunk] = []
        tensors = fill.layout.tensors
        size = self.chunk_size(fill.layout.tensor_bytes)
        for run in fill.layout.runs:
            for start in range(run.file_start, run.file_end, size):
                end = min(start + size, run.file_end)
                covered = tuple(i for i in run.tensors
                                if tensors[i].file_start < end
                                and tensors[i].file_start + tensors[i].nbytes > start)
                out.append(_Chunk(fill, run.file, start, end, run.offset + start - run.file_start, covered,
                                  next(self._seq), (*rank, start)))
        return out

    def _work(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        return
                    task = self._next_task()
                    if task is not None:
                        break
                    self._cv.wait(timeout=0.05 if self._running else None)
                hedge, chunk = task
                token = next(self._seq)
                if not hedge:
                    self._running[token] = _Running(chunk, time.monotonic())
                self.inflight += 1
            self.observer.on_inflight(1)
            try:
                self._run(chunk, hedge)
            finally:
                self.observer.on_inflight(-1)
                with self._cv:
                    self._running.pop(token, None)
                    self.inflight -= 1

    def _next_task(self) -> tuple[bool, _Chunk] | None:
        """The most urgent work (caller holds the lock): a queued chunk, or a duplicate read of
        a straggler. A chunk is a straggler when most of its group has landed and it has run
        much longer than its siblings took (a starved TCP flow, a slow S3 node): the first of
        the two reads to finish fills the segment, so one slow flow cannot hold a layer back."""
        head = self._heap[0][0] if self._heap else None
        if self.hedge_min_s is not None and self._running:
            now = time.monotonic()
            best: _Running | None = None
            # only the earliest group in flight (the one a loader waits for next) is worth
            # duplicate bytes on a shared link; later groups' stragglers usually catch up
            earliest = min(r.chunk.priority[:2] for r in self._running.values())
            for run in self._running.values():
                chunk = run.chunk
                fill = chunk.fill
                if run.hedged or fill.failed or chunk.seq in fill.done_chunks:
                    continue
                if chunk.priority[:2] != earliest and head is not None:
                    continue
                if head is not None and head <= chunk.priority:
                    continue
                if len(fill.durations) * 4 < fill.chunks_total * 3:
                    continue
                typical = sorted(fill.durations)[len(fill.durations) // 2]
                if now - run.started < max(self.hedge_min_s, HEDGE_FACTOR * typical):
                    continue
                if best is None or chunk.priority < best.chunk.priority:
                    best = run
            if best is not None:
                best.hedged = True
                self.hedges += 1
                self.observer.on_hedge("started")
                return True, best.chunk
        if self._heap:
            return False, heapq.heappop(self._heap)[2]
        return None

    def _run(self, chunk: _Chunk, hedge: bool = False) -> None:
        fill = chunk.fill
        if fill.failed or chunk.seq in fill.done_chunks:
            return
        started = time.monotonic()
        try:
            data = self._fetch(chunk, into_segment=not hedge)
        except BaseException as exc:
            if chunk.seq in fill.done_chunks:
                return  # the other read of this chunk won; this one's failure does not matter
            if hedge:
                self.observer.on_hedge("failed")
                return  # the original read is still going and decides
            self._fail(fill, exc)
            return
        done = False
        with fill.lock:
            if chunk.seq in fill.done_chunks or fill.failed:
                return
            if data is not None:
                fill.writer.write(chunk.offset, data)
            fill.done_chunks.add(chunk.seq)
            if not hedge:
                fill.durations.append(time.monotonic() - started)
            fill.bytes_done += chunk.end - chunk.start
            ready = []
            for i in chunk.tensors:
                fill.pending[i] -= 1
                if fill.pending[i] == 0:
                    ready.append(i)
            fill.chunks_left -= 1
            done = fill.chunks_left == 0
        if hedge:
            self.observer.on_hedge("won")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("chunk done", extra={"group": fill.layout.group, "start": chunk.start, "hedge": hedge,
                                           "seconds": round(time.monotonic() - started, 3),
                                           "since_fill": round(time.monotonic() - fill.started, 3)})
        for i in ready:
            self._publish(fill, i)
        if done:
            fill.on_done(fill, None)

    def _publish(self, fill: Fill, i: int) -> None:
        if not fill.defer_publish:
            fill.writer.mark_ready(i)
        fill.tensors_done += 1
        if fill.on_tensor is not None:
            fill.on_tensor(fill, i)

    def _fail(self, fill: Fill, exc: BaseException) -> None:
        with fill.lock:
            if fill.failed:
                return
            fill.failed = True
        log.warning("segment fetch failed: %s", exc, extra={"group": fill.layout.group})
        fill.on_done(fill, exc)

    def _fetch(self, chunk: _Chunk, *, into_segment: bool = True) -> bytes | None:
        """Peers first (each skipped after its first failure), then S3 with retries; the bytes
        land in the segment (straight from the socket when the source can ``read_into``)."""
        want = chunk.end - chunk.start
        fill = chunk.fill
        for source in fill.sources:
            if source.label in fill.bad_sources:
                continue
            if source.kind != "s3":
                try:
                    data = source.read(chunk.file, chunk.start, chunk.end)
                    if len(data) != want:
                        raise IntegrityError(f"peer sent {len(data)} B, expected {want}")
                    self.observer.on_bytes(source.kind, want)
                    return data
                except Exception as exc:
                    fill.bad_sources.add(source.label)
                    self.observer.on_error(source.kind, type(exc).__name__)
                    log.info("peer %s failed (%s); falling back", source.label, exc)
                    continue
            return self._read_retrying(source, chunk, into_segment)
        raise PermanentError("no source left to read from")

    def _read_retrying(self, source: RangeReader, chunk: _Chunk, into_segment: bool) -> bytes | None:
        """The chunk from ``source`` with retries: written straight into the segment when
        possible (returns None), else returned (hedges never write until they win)."""
        want = chunk.end - chunk.start
        deadline = time.monotonic() + self.retry_budget_s
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                read_into = getattr(source, "read_into", None)
                if read_into is not None and into_segment:
                    read_into(chunk.file, chunk.start, chunk.fill.writer.view[chunk.offset:chunk.offset + want])
                    self.observer.on_bytes(source.kind, want)
                    return None
                data = source.read(chunk.file, chunk.start, chunk.end)
                if len(data) != want:
                    raise IntegrityError(f"{chunk.file}[{chunk.start}:{chunk.end}]: got {len(data)} B")
                self.observer.on_bytes(source.kind, want)
                return data
            except HydraError as exc:
                self.observer.on_error(source.kind, type(exc).__name__)
                if not exc.retryable:
                    raise
                last: BaseException = exc
            except (OSError, ConnectionError, TimeoutError) as exc:
                self.observer.on_error(source.kind, type(exc).__name__)
                last = exc
            if fill_failed(chunk) or time.monotonic() + delay > deadline or self._closed:
                raise PermanentError(
                    f"{chunk.file}[{chunk.start}:{chunk.end}] failed after {attempt} attempts "
                    f"in {self.retry_budget_s:.0f} s: {last}") from last
            log.info("range read failed (%s); retry %d in %.2f s", last, attempt, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    def close(self) -> None:
        """Stop the threads (queued chunks are dropped; in-flight ones finish their read)."""
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)


def fill_failed(chunk: _Chunk) -> bool:
    return chunk.fill.failed
