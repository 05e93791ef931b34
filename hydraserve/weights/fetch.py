"""The fetch engine: many concurrent ranged reads into segments, first layers first.

The one fetch path of the platform: loaderd (hydraserve.loaderd.service) fills its
shared-memory segments with it, and a process without a daemon (the runtime's direct-S3
fallback, ``hydraserve generate`` on an s3:// model) fills anonymous-memory segments with it
through hydraserve.weights.fetched_source. A fixed pool of worker threads takes work from one
priority queue of runs ordered by (group order, request, offset), so the first layers of every
cold start on the node land first; each thread cuts its next chunk off the most urgent run when
it is free (size: see chunk_size). A tensor is published the moment its last chunk is written
and, when the manifest has per-tensor hashes (format 2), its sha256 matched (a mismatch
refetches that tensor's range; it is never published). Sources are tried in order (peers
first, S3 last); a failing peer is skipped for the rest of that segment. The engine never
retries a read itself: a source owns its retries (S3: the client's one retry budget,
hydraserve.weights.s3), so a dead store fails a chunk once, within that budget.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from hydraserve.errors import IntegrityError, PermanentError
from hydraserve.weights.segment import Run, SegmentLayout, SegmentWriter

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 8 << 20
# Measured on the emulated node (docs/LOADERD.md, 4 runs each of 4/6/8 at 400 and 1200 Mbit):
# 4 streams fill a link of up to 150 MB/s (0.93-0.95 of it) with the earliest first layer and
# the least CPU; 8 let TCP flows starve each other at the shaped link (first layer up to 0.3 s
# late). Real S3 serves ~50-90 MB/s per connection with 20-50 ms to first byte: a 16 Gbps node
# wants ~32 (Run:ai's default), set with --concurrency.
DEFAULT_CONCURRENCY = 4
DEFAULT_MIN_CHUNK_BYTES = 1 << 20
# Measured on a 400 Mbit emulated node (hydraserve bench loader): striping each group into
# 3 chunks per stream and hedging a chunk at 1.5x its siblings' median time gave the earliest
# first layer; 1 chunk per stream let one slow TCP flow hold every layer back to the end.
STRIPES_PER_STREAM = 3
HEDGE_FACTOR = 1.5
TARGET_CHUNK_S = 0.1  # a chunk should take about this long on one stream (per-request costs)
DEFAULT_HEDGE_MIN_S = 0.25  # a straggler is hedged no sooner than this
BACKGROUND = 1 << 30  # added to a background request's group order: after every cold start's bytes


class RangeReader(Protocol):
    """Reads [start, end) of a model file, retrying what it can itself. ``kind`` is "s3" (the
    store, tried last), "peer" or "local" (metrics); ``label`` names it in logs."""

    @property
    def kind(self) -> str: ...

    @property
    def label(self) -> str: ...

    def read(self, file: str, start: int, end: int, cancel: threading.Event | None = None) -> bytes: ...

    def read_into(self, file: str, start: int, out: memoryview, cancel: threading.Event | None = None) -> None:
        """Fill ``out`` with bytes [start, start + len(out)) (straight from the socket for S3);
        ``cancel`` set means stop retrying now."""
        ...


class FetchObserver(Protocol):
    """What the engine reports (the daemon's Prometheus metrics implement it)."""

    def on_bytes(self, kind: str, n: int) -> None: ...
    def on_error(self, kind: str, error: str) -> None: ...
    def on_inflight(self, delta: int) -> None: ...
    def on_hedge(self, outcome: str) -> None: ...


class NullObserver:
    """Reports nothing (subclass it to count one thing)."""

    def on_bytes(self, kind: str, n: int) -> None: ...
    def on_error(self, kind: str, error: str) -> None: ...
    def on_inflight(self, delta: int) -> None: ...
    def on_hedge(self, outcome: str) -> None: ...


class FetchCancelled(Exception):
    """A fill stopped because nobody holds its segment any more (an abandoned prefetch)."""


@dataclass
class Fill:
    """One segment being filled: bytes left per tensor and the completion callback."""

    layout: SegmentLayout
    writer: SegmentWriter
    sources: list[RangeReader]
    on_done: Callable[[Fill, BaseException | None], None]
    on_tensor: Callable[[Fill, int], None] | None = None
    defer_publish: bool = False  # the owner publishes readiness itself (after verification)
    max_refetch: int = 1  # reads of a tensor whose sha256 did not match, before it is failed
    failed: bool = False
    bad_sources: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    tensor_left: list[int] = field(default_factory=list)  # bytes still to land, per tensor
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_queued: int = 0  # not yet handed to a stream
    tensors_done: int = 0
    done_chunks: set[int] = field(default_factory=set)
    durations: list[float] = field(default_factory=list)  # seconds of each chunk read so far
    started: float = field(default_factory=time.monotonic)
    order: tuple[int, int] = (0, 0)  # (group order, request): where refetches queue
    verifying: int = 0  # tensors whose bytes landed and are being hashed
    finished: bool = False  # on_done was called
    refetches: dict[int, int] = field(default_factory=dict)
    bad_tensors: list[int] = field(default_factory=list)  # failed verification for good
    verify_seconds: float = 0.0  # time spent hashing tensors

    def expected_sha256(self, i: int) -> str | None:
        return self.layout.sha256[i] if self.layout.sha256 else None


@dataclass
class _Cursor:
    """The not-yet-dispatched rest of one run; chunks are cut from it when a stream is free."""

    fill: Fill
    run: Run
    next_start: int
    order: tuple[int, int]


@dataclass(frozen=True)
class _Chunk:
    fill: Fill
    file: str
    start: int
    end: int
    offset: int
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
                 hedge_min_s: float | None = DEFAULT_HEDGE_MIN_S, observer: FetchObserver | None = None,
                 name: str = "fetch") -> None:
        if concurrency < 1 or chunk_bytes < 4096:
            raise ValueError("concurrency >= 1 and chunk_bytes >= 4096 required")
        self.chunk_bytes = chunk_bytes
        self.min_chunk_bytes = min(min_chunk_bytes, chunk_bytes)
        self.concurrency = concurrency
        self.hedge_min_s = hedge_min_s  # None: never hedge
        self.hedges = 0
        self._running: dict[int, _Running] = {}
        self.observer: FetchObserver = observer or NullObserver()
        self._heap: list[tuple[tuple[int, int, int], int, _Cursor]] = []
        self._seq = itertools.count()
        self._request_seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._cancel = threading.Event()  # set by close(): sources stop retrying at once
        self._recent: list[tuple[float, int]] = []  # (finished at, bytes) of recent chunks
        self.inflight = 0
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(concurrency)]
        for t in self._threads:
            t.start()

    def submit(self, fills: list[tuple[int, Fill]], *, background: bool = False) -> None:
        """Queue segments (with their group order) of one request; returns at once. A
        ``background`` request (consolidation) is served only when no other bytes are queued."""
        request = next(self._request_seq)
        cursors: list[_Cursor] = []
        for order, fill in fills:
            order += BACKGROUND if background else 0
            fill.order = (order, request)
            fill.tensor_left = [t.nbytes for t in fill.layout.tensors]
            fill.bytes_total = fill.bytes_queued = sum(r.nbytes for r in fill.layout.runs)
            for i, left in enumerate(fill.tensor_left):
                if left == 0 and self._verify(fill, i):  # empty tensor: nothing to fetch
                    self._publish(fill, i)
            if fill.bytes_total == 0:
                self._finish(fill)
                continue
            cursors.extend(_Cursor(fill, run, run.file_start, (order, request))
                           for run in fill.layout.runs if run.nbytes)
        with self._cv:
            for cursor in cursors:
                heapq.heappush(self._heap, ((*cursor.order, cursor.next_start), next(self._seq), cursor))
            self._cv.notify_all()

    def stream_rate(self) -> float | None:
        """Bytes/s one stream is getting lately (None until ~0.5 s of history); caller locks."""
        now = time.monotonic()
        self._recent = [(t, n) for t, n in self._recent if t > now - 2.0]
        if not self._recent or now - self._recent[0][0] < 0.5:
            return None
        span = now - self._recent[0][0]
        return sum(n for _, n in self._recent) / span / self.concurrency

    def chunk_size(self, group_bytes: int, stream_rate: float | None = None) -> int:
        """Bytes per ranged read for a group: the group striped over the streams (3 chunks each,
        so its chunks run side by side, fast flows take more of them, and none is left alone
        sharing the link with the next group), no bigger than ``chunk_bytes`` and no smaller
        than ~0.1 s of one stream's recent rate (``min_chunk_bytes`` before there is one):
        small enough to balance, big enough that per-request costs stay small."""
        floor = self.min_chunk_bytes
        if stream_rate is not None:
            floor = max(floor, min(self.chunk_bytes, int(stream_rate * TARGET_CHUNK_S)))
        striped = -(-group_bytes // (self.concurrency * STRIPES_PER_STREAM))
        striped = -(-striped // 65536) * 65536
        return max(floor, min(self.chunk_bytes, striped))

    def _cut(self) -> _Chunk:
        """Cut the next chunk from the most urgent cursor (caller holds the lock)."""
        _, _, cursor = heapq.heappop(self._heap)
        fill, run = cursor.fill, cursor.run
        size = self.chunk_size(fill.layout.tensor_bytes, self.stream_rate())
        start = cursor.next_start
        end = min(start + size, run.file_end)
        if run.file_end - end < size // 4:
            end = run.file_end  # no sliver of a chunk left over
        fill.bytes_queued -= end - start
        if end < run.file_end:
            cursor.next_start = end
            heapq.heappush(self._heap, ((*cursor.order, end), next(self._seq), cursor))
        return _Chunk(fill, run.file, start, end, run.offset + start - run.file_start, next(self._seq),
                      (*cursor.order, start))

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
        """The most urgent work (caller holds the lock): the next chunk of the most urgent run,
        or a duplicate read of a straggler. A chunk is a straggler when the rest of its group
        is dispatched, half of it has landed, and it has run much longer than its siblings took
        (a starved TCP flow, a slow S3 node): the first of the two reads to finish fills the
        segment, so one slow flow cannot hold a layer back. Only the earliest group in flight
        (the one a loader waits for next) or the very last chunks are worth duplicate bytes."""
        head = self._heap[0][0] if self._heap else None
        if self.hedge_min_s is not None and self._running:
            now = time.monotonic()
            best: _Running | None = None
            earliest = min(r.chunk.priority[:2] for r in self._running.values())
            for run in self._running.values():
                chunk = run.chunk
                fill = chunk.fill
                if run.hedged or fill.failed or chunk.seq in fill.done_chunks:
                    continue
                if head is not None and (chunk.priority[:2] != earliest or head <= chunk.priority):
                    continue
                if fill.bytes_queued > 0 or fill.bytes_done * 2 < fill.bytes_total or not fill.durations:
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
            return False, self._cut()
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
        nbytes = chunk.end - chunk.start
        with fill.lock:
            if chunk.seq in fill.done_chunks or fill.failed:
                return
            if data is not None:
                fill.writer.write(chunk.offset, data)
            fill.done_chunks.add(chunk.seq)
            if not hedge:
                fill.durations.append(time.monotonic() - started)
            fill.bytes_done += nbytes
            ready = []
            for i, t in enumerate(fill.layout.tensors):
                if t.file != chunk.file or not fill.tensor_left[i]:
                    continue
                overlap = min(chunk.end, t.end) - max(chunk.start, t.start)
                if overlap > 0:
                    fill.tensor_left[i] -= overlap
                    if fill.tensor_left[i] == 0:
                        ready.append(i)
            fill.verifying += len(ready)
        with self._cv:
            self._recent.append((time.monotonic(), nbytes))
        if hedge:
            self.observer.on_hedge("won")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("chunk done", extra={"group": fill.layout.group, "start": chunk.start, "bytes": nbytes, "hedge": hedge,
                                           "seconds": round(time.monotonic() - started, 3),
                                           "since_fill": round(time.monotonic() - fill.started, 3)})
        for i in ready:
            try:
                if self._verify(fill, i):
                    self._publish(fill, i)
            except ValueError:  # its segment's memory was released meanwhile: the fill was cancelled
                if not fill.failed:
                    raise
                break
        with fill.lock:
            fill.verifying -= len(ready)
        self._finish(fill)

    def _finish(self, fill: Fill) -> None:
        """Call on_done once: every byte landed and every tensor verified (or failed for good)."""
        with fill.lock:
            if fill.finished or fill.failed or fill.verifying or fill.bytes_done != fill.bytes_total:
                return
            fill.finished = True
        if fill.bad_tensors:
            names = [fill.layout.tensors[i].name for i in fill.bad_tensors]
            fill.on_done(fill, IntegrityError(
                f"sha256 mismatch in {len(names)} tensor(s) after {fill.max_refetch} refetch(es): {names[:3]}"))
        else:
            fill.on_done(fill, None)

    def _verify(self, fill: Fill, i: int) -> bool:
        """True if tensor i's bytes match its manifest hash (or it has none). On a mismatch the
        tensor is queued again (its whole range, ahead of later groups) until ``max_refetch``
        reads failed, then flagged failed; it is never published."""
        expected = fill.expected_sha256(i)
        if expected is None:
            return True
        slot = fill.layout.tensors[i]
        offset = fill.layout.offsets[i]
        t0 = time.perf_counter()
        actual = hashlib.sha256(fill.writer.view[offset:offset + slot.nbytes]).hexdigest()
        fill.verify_seconds += time.perf_counter() - t0
        if actual == expected:
            return True
        self.observer.on_error("verify", "IntegrityError")
        with fill.lock:
            tries = fill.refetches.get(i, 0)
            if tries >= fill.max_refetch or fill.failed:
                log.error("tensor %s failed verification %d times; not served", slot.name, tries + 1,
                          extra={"group": fill.layout.group})
                fill.bad_tensors.append(i)
                fill.writer.mark_failed(i)
                return False
            fill.refetches[i] = tries + 1
            fill.tensor_left[i] = slot.nbytes
            fill.bytes_done -= slot.nbytes
            fill.bytes_queued += slot.nbytes
        log.warning("tensor %s: sha256 mismatch; refetching its range", slot.name,
                    extra={"group": fill.layout.group})
        run = Run(slot.file, slot.start, slot.end, offset, (i,))
        cursor = _Cursor(fill, run, run.file_start, fill.order)
        with self._cv:
            heapq.heappush(self._heap, ((*cursor.order, cursor.next_start), next(self._seq), cursor))
            self._cv.notify_all()
        return False

    def _publish(self, fill: Fill, i: int) -> None:
        if not fill.defer_publish:
            fill.writer.mark_ready(i)
        fill.tensors_done += 1
        if fill.on_tensor is not None:
            fill.on_tensor(fill, i)

    def cancel(self, fill: Fill, reason: str) -> None:
        """Stop filling ``fill`` (nobody wants it any more): its queued chunks are dropped, a read
        under way is let finish and its bytes ignored, and on_done hears FetchCancelled."""
        with self._cv:
            kept = [entry for entry in self._heap if entry[2].fill is not fill]
            if len(kept) != len(self._heap):
                self._heap = kept
                heapq.heapify(self._heap)
        self._fail(fill, FetchCancelled(reason))

    def _fail(self, fill: Fill, exc: BaseException) -> None:
        with fill.lock:
            if fill.failed:
                return
            fill.failed = True
        log.warning("segment fetch failed: %s", exc, extra={"group": fill.layout.group})
        fill.on_done(fill, exc)

    def _fetch(self, chunk: _Chunk, *, into_segment: bool = True) -> bytes | None:
        """Peers first (each skipped after its first failure), then S3 (which retries within its
        own budget); the bytes land in the segment straight from the source, or come back
        (hedges never write until they win)."""
        want = chunk.end - chunk.start
        fill = chunk.fill
        for source in fill.sources:
            if source.label in fill.bad_sources:
                continue
            try:
                if into_segment:
                    source.read_into(chunk.file, chunk.start, fill.writer.view[chunk.offset:chunk.offset + want],
                                     self._cancel)
                    data = None
                else:
                    data = source.read(chunk.file, chunk.start, chunk.end, self._cancel)
                    if len(data) != want:
                        raise IntegrityError(f"{source.label} sent {len(data)} B of {chunk.file}"
                                             f"[{chunk.start}:{chunk.end}], expected {want}")
            except Exception as exc:
                self.observer.on_error(source.kind, type(exc).__name__)
                if source is fill.sources[-1] or self._closed:
                    raise
                fill.bad_sources.add(source.label)
                log.info("source %s failed (%s); falling back", source.label, exc)
                continue
            self.observer.on_bytes(source.kind, want)
            return data
        raise PermanentError("no source left to read from")

    def close(self, wait_s: float = 5.0) -> None:
        """Stop the threads: queued chunks are dropped, sources stop retrying, and reads in
        progress are waited for up to ``wait_s`` in all (then left to finish in the background)."""
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._cv.notify_all()
        self._cancel.set()
        deadline = time.monotonic() + wait_s
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))
