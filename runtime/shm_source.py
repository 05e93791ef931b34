"""The runtime's TensorSource over loaderd shared memory, with a direct-S3 fallback.

Called by the worker's model loading (through ``open_shm_source`` or ``LoaderModelFiles``).
With a daemon: attach to the slice (lease tied to this pid), map each segment read-only
(os.open + mmap, never SharedMemory: DESIGN §8) and hand out zero-copy tensor views, each
blocking until its bytes have landed. Without one (connection refused / timeout): log that we
fell back and fetch the same slice from S3 with loaderd's own fetch engine into private memory,
still tensor by tensor, so loading overlaps the download either way.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable

import torch

from hydraserve.contracts.loader import AttachRequest
from hydraserve.contracts.stage import StageSpec
from hydraserve.errors import TemporaryError
from hydraserve.loaderd.client import LoaderClient, LoaderUnavailableError
from hydraserve.loaderd.fetcher import DEFAULT_CHUNK_BYTES, DEFAULT_CONCURRENCY, FetchEngine, Fill
from hydraserve.loaderd.segment import (
    STATE_COMPLETE,
    STATE_FAILED,
    SegmentFailedError,
    SegmentReader,
    SegmentWriter,
    plan_layout,
)
from hydraserve.weights.safetensors_format import DTYPES
from hydraserve.weights.source import TensorSource

log = logging.getLogger(__name__)

class SegmentTensors:
    """Tensors of a set of segment readers by name; ``get`` blocks until a tensor is ready."""

    def __init__(self, readers: list[SegmentReader], *, wait_timeout_s: float | None = 600.0,
                 alive: Callable[[], bool] | None = None) -> None:
        self._readers = readers
        self._alive = alive  # is whoever fills the segments still there? (checked every second)
        self._where: dict[str, tuple[SegmentReader, int]] = {}
        for reader in readers:
            for i, slot in enumerate(reader.tensors):
                self._where[slot.name] = (reader, i)
        self.wait_timeout_s = wait_timeout_s

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        reader, i = self._where[name]  # KeyError for a name outside the slice
        deadline = None if self.wait_timeout_s is None else time.monotonic() + self.wait_timeout_s
        while True:
            step = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            try:
                reader.wait_ready(i, timeout_s=step)
                break
            except SegmentFailedError as exc:
                raise TemporaryError(f"tensor {name}: {exc}", retry_after_s=1) from exc
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                if self._alive is not None and not self._alive():
                    raise TemporaryError(f"tensor {name}: loaderd stopped answering while its bytes were "
                                         "still arriving", retry_after_s=1) from None
        slot = reader.tensors[i]
        if slot.dtype not in DTYPES:
            raise TypeError(f"tensor {name}: unsupported dtype {slot.dtype}")
        dtype = DTYPES[slot.dtype][0]
        if slot.nbytes == 0:
            return torch.empty(slot.shape, dtype=dtype)
        with warnings.catch_warnings():  # read-only buffer: callers must not write (TensorSource)
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(reader.view, dtype=dtype, count=slot.nbytes // dtype.itemsize,
                                    offset=slot.offset)
        return flat.view(slot.shape)

    def close(self) -> None:
        for reader in self._readers:
            try:
                reader.close()
            except BufferError:
                pass  # tensors still reference the mapping; it goes when they do
        self._readers = []


class ShmTensorSource:
    """TensorSource over a loaderd lease. ``tensor_names`` lists the slice's tensors only."""

    def __init__(self, client: LoaderClient, lease_id: str, paths: list[str], names: list[str], *,
                 wait_timeout_s: float | None = 600.0) -> None:
        self._client = client
        self.lease_id = lease_id
        self._tensors = SegmentTensors([SegmentReader(p) for p in paths], wait_timeout_s=wait_timeout_s,
                                       alive=LoaderClient(client.url, "").healthy)
        self._names = names
        self.via = "loaderd"

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors.get(name)

    def close(self) -> None:
        self._tensors.close()
        try:
            self._client.release(self.lease_id)
        except Exception as exc:  # the daemon reaps leases of dead pids anyway
            log.warning("could not release loaderd lease %s: %s", self.lease_id, exc)
        self._client.close()


def open_shm_source(model_uri: str, *, stage: StageSpec | None = None, tensors: list[str] | None = None,
                    loader_url: str | None = None, token: str | None = None,
                    endpoint_url: str | None = None, peers: list[str] | None = None,
                    wait_timeout_s: float | None = 600.0,
                    on_fallback: Callable[[str], None] | None = None) -> TensorSource:
    """Tensors of a slice from the node's loaderd, or straight from S3 if no daemon answers.

    ``loader_url``/``token`` default to HYDRASERVE_LOADERD_URL / HYDRASERVE_LOADERD_TOKEN.
    Errors the daemon returns (bad request, budget full, integrity) are raised, not hidden by
    the fallback; only "no daemon answered" falls back.
    """
    loader_url = loader_url or os.environ.get("HYDRASERVE_LOADERD_URL")
    token = token or os.environ.get("HYDRASERVE_LOADERD_TOKEN", "")
    reason = "no loaderd configured (HYDRASERVE_LOADERD_URL unset)"
    if loader_url:
        client = LoaderClient(loader_url, token)
        try:
            lease = client.attach(AttachRequest(model_uri=model_uri, endpoint_url=endpoint_url,
                                                stage=stage, tensors=tensors, peers=peers or [],
                                                pid=os.getpid()))
        except LoaderUnavailableError as exc:
            client.close()
            reason = f"loaderd at {loader_url} did not answer ({exc.message})"
        else:
            log.info("loading through loaderd", extra={"loaderd": loader_url, "lease": lease.lease_id,
                                                       "bytes": lease.bytes_total, "bytes_new": lease.bytes_new})
            return ShmTensorSource(client, lease.lease_id, [s.path for s in lease.segments],
                                   lease.tensor_names, wait_timeout_s=wait_timeout_s)
    log.warning("falling back to direct S3 fetch: %s", reason, extra={"model": model_uri})
    if on_fallback is not None:
        on_fallback(reason)
    return DirectS3Source(model_uri, stage=stage, tensors=tensors, endpoint_url=endpoint_url,
                          wait_timeout_s=wait_timeout_s)


class DirectS3Source:
    """The fallback: loaderd's fetch engine filling private (anonymous) segments from S3."""

    def __init__(self, model_uri: str, *, stage: StageSpec | None = None, tensors: list[str] | None = None,
                 endpoint_url: str | None = None, wait_timeout_s: float | None = 600.0,
                 concurrency: int = DEFAULT_CONCURRENCY, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 backends: tuple[Callable, Callable] | None = None) -> None:
        if backends is None:
            from hydraserve.loaderd.daemon import default_backends

            backends = default_backends()
        resolve, s3_source = backends
        index = resolve(model_uri, endpoint_url)
        specs = index.select(stage, tensors)
        self._names = [t.name for t in specs]
        self._engine = FetchEngine(concurrency=concurrency, chunk_bytes=chunk_bytes, name="direct-s3")
        self._writers: list[SegmentWriter] = []
        self._left = 0
        self._lock = threading.Lock()
        fills = []
        reader = s3_source(index)
        for order, group, members in index.groups(specs):
            writer = SegmentWriter(plan_layout(index.key, group, members), None)
            self._writers.append(writer)
            fills.append((order, Fill(writer.layout, writer, [reader], on_done=self._done)))
        self._left = len(fills)
        self._tensors = SegmentTensors([SegmentReader(buffer=w.buffer) for w in self._writers],
                                       wait_timeout_s=wait_timeout_s)
        self.via = "s3"
        self._engine.submit(fills)

    def _done(self, fill: Fill, exc: BaseException | None) -> None:
        fill.writer.set_state(STATE_FAILED if exc is not None else STATE_COMPLETE)
        if exc is not None:
            log.error("direct S3 fetch failed: %s", exc)
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._engine.close()  # all bytes are here: the fetch threads can go

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors.get(name)

    def close(self) -> None:
        self._engine.close()
        self._tensors.close()
        for writer in self._writers:
            writer.close()
