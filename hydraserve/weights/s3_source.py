"""TensorSource over S3: concurrent ranged GETs of exactly the tensors asked for.

Made by :meth:`hydraserve.weights.model_files.ModelFiles.tensor_source` for an ``s3://``
model; used by the runtime when no loaderd answers. Fetching starts at construction, in
streaming order (embeddings, layer 0, 1, ..., head) on a thread pool; ``get(name)`` blocks
until that tensor's run has arrived, so the model loader builds layer 0 while later layers
are still downloading. Bytes land directly in one buffer per run (no temp file, no extra
copy); tensors are zero-copy views of those buffers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from hydraserve.weights.ranges import FetchChunk, FetchRun, MiB, plan_fetch
from hydraserve.weights.s3 import S3Client, S3Uri
from hydraserve.weights.safetensors_format import TensorLocation, tensor_from_buffer


class _RunState:
    def __init__(self, run: FetchRun, chunks: int) -> None:
        self.run = run
        self.buffer = bytearray(run.nbytes)
        self.pending = chunks
        self.done = threading.Event()
        self.error: BaseException | None = None
        if chunks == 0:
            self.done.set()


class S3TensorSource:
    """Tensors of an S3 checkpoint, fetched once, concurrently, in layer order."""

    def __init__(self, client: S3Client, files: Mapping[str, S3Uri],
                 locations: Mapping[str, TensorLocation], *, concurrency: int = 8,
                 chunk_bytes: int = 16 * MiB) -> None:
        self._client = client
        self._files = dict(files)
        runs, chunks = plan_fetch(locations.values(), chunk_bytes)
        self.runs = runs
        self.chunks = chunks
        self._states = [_RunState(r, sum(1 for c in chunks if c.run == i)) for i, r in enumerate(runs)]
        self._run_of: dict[str, int] = {}
        for i, run in enumerate(runs):
            for entry in run.tensors:
                self._run_of[entry.name] = i
        self._names = [e.name for r in runs for e in r.tensors]
        self._lock = threading.Lock()
        self.bytes_fetched = 0
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self._remaining = len(chunks)
        self._closed = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency),
                                        thread_name_prefix="s3-fetch")
        self._futures: list[Future[None]] = [self._pool.submit(self._fetch, c) for c in chunks]
        if not chunks:
            self.finished_at = self.started_at

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.runs)

    def _fetch(self, chunk: FetchChunk) -> None:
        state = self._states[chunk.run]
        if state.error is not None:
            return
        run = state.run
        uri = self._files[run.file]
        try:
            view = memoryview(state.buffer)[chunk.start - run.start:chunk.end - run.start]
            self._client.get_range_into(uri.bucket, uri.key, chunk.start, view, cancel=self._closed)
        except BaseException as exc:
            state.error = exc
            state.done.set()
            return
        with self._lock:
            self.bytes_fetched += chunk.end - chunk.start
            state.pending -= 1
            self._remaining -= 1
            if self._remaining == 0:
                self.finished_at = time.monotonic()
            if state.pending == 0:
                state.done.set()

    # ------------------------------------------------------------------ TensorSource

    def tensor_names(self) -> list[str]:
        """The tensors this source fetches (a stage's subset), in streaming order."""
        return list(self._names)

    def ready(self, name: str) -> bool:
        state = self._states[self._run_of[name]]
        return state.done.is_set() and state.error is None

    def get(self, name: str, timeout: float | None = None) -> torch.Tensor:
        """The tensor (a view of its run's buffer); blocks until its bytes have arrived.

        Raises KeyError for a name not in this source, the fetch's error (StorageError,
        TemporaryError) if its run failed, TimeoutError after ``timeout`` seconds.
        """
        state = self._states[self._run_of[name]]
        if not state.done.wait(timeout):
            raise TimeoutError(f"tensor {name} not fetched within {timeout} s")
        if state.error is not None:
            raise state.error
        entry = next(e for e in state.run.tensors if e.name == name)
        return tensor_from_buffer(entry, state.buffer, entry.start - state.run.start)

    def wait_all(self, timeout: float | None = None) -> None:
        """Block until every run has arrived; raises the first fetch error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for state in self._states:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not state.done.wait(left):
                raise TimeoutError(f"fetch not finished within {timeout} s")
            if state.error is not None:
                raise state.error

    def close(self) -> None:
        """Cancel chunks not started and stop retries (a GET in progress finishes in the
        background); a later get() of a tensor that had not arrived raises, never hangs."""
        self._closed.set()  # in-flight chunks stop retrying
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for state in self._states:
            if not state.done.is_set():
                state.error = RuntimeError("S3TensorSource closed before this tensor arrived")
                state.done.set()
