"""ModelFiles through the node's loaderd: small files and the tensor index over its API, weights
as zero-copy views of its shared memory; S3 itself when no daemon answers.

Used by the worker's start-up for s3:// models when a loaderd is configured. Light at import (no
torch, no boto3): the worker reads config.json, the tokenizer files and the index through it
while torch is still importing, and creates an S3 client only if the daemon does not answer
(then it fetches the same tensors with the same fetch engine and says so). Only "no daemon
answered" falls back; errors the daemon returns (bad request, budget full, integrity) are
raised, not hidden. Weights come from ``POST /v1/attach`` with exactly the names asked for
(the lease is tied to this pid, or, in a pod, kept alive by a heartbeat), each segment mapped
read-only with os.open + mmap.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from hydraserve.contracts.loader import AttachRequest
from hydraserve.contracts.tensors import TensorEntry
from hydraserve.errors import UnreachableError
from hydraserve.loaderd.client import LoaderClient
from hydraserve.weights.model_files import ModelFiles, StoredModelFiles
from hydraserve.weights.tensor_sources import tensor_source

if TYPE_CHECKING:
    from hydraserve.weights.source import TensorSource

log = logging.getLogger(__name__)

# Read ahead at start-up (optional ones answer 404 and read as absent).
HEARTBEAT_S = 30.0  # a heartbeat lease outlives its reader by at most this
STARTUP_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class LoaderModelFiles(ModelFiles):
    """The files of one s3:// model as this node's loaderd serves them."""

    def __init__(self, model_uri: str, loader_url: str, token: str | Callable[[], str], *,
                 endpoint_url: str | None = None,
                 s3_retry_budget_s: float | None = None,
                 on_fallback: Callable[[str], None] | None = None, heartbeat: bool = False) -> None:
        self.uri = model_uri
        self._heartbeat = heartbeat  # leases renewed, not tied to our pid (a pod)
        self._sources: list[ShmTensorSource] = []  # every lease handed out (released at shutdown)
        self._endpoint_url = endpoint_url
        self._s3_retry_budget_s = s3_retry_budget_s
        self._on_fallback = on_fallback
        self._client = LoaderClient(loader_url, token)
        self._direct: StoredModelFiles | None = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=len(STARTUP_FILES) + 1, thread_name_prefix="files")
        self._ahead: dict[str, Future[bytes]] = {
            name: self._pool.submit(self._client.read_file, model_uri, name, endpoint_url) for name in STARTUP_FILES}
        self._index_ahead = self._pool.submit(self._client.index, model_uri, endpoint_url)
        self._pool.shutdown(wait=False)  # the read-ahead runs on; nothing else is submitted

    @property
    def via(self) -> str:
        return "s3" if self._direct is not None else "loaderd"

    def _fall_back(self, exc: UnreachableError) -> StoredModelFiles:
        """S3 itself, from now on (said once, in the log and on the timeline)."""
        with self._lock:
            if self._direct is None:
                from hydraserve.weights.model_files import open_model
                from hydraserve.weights.retry import RetryPolicy
                from hydraserve.weights.s3 import S3Client

                reason = f"loaderd at {self._client.url} did not answer ({exc.message})"
                log.warning("falling back to direct S3 fetch: %s", reason, extra={"model": self.uri})
                if self._on_fallback is not None:
                    self._on_fallback(reason)
                retry = RetryPolicy(budget_s=self._s3_retry_budget_s) if self._s3_retry_budget_s else None
                self._direct = open_model(self.uri, client=S3Client(self._endpoint_url, retry=retry))
            return self._direct

    def _through_loaderd(self, call: Callable[[], Any], direct: Callable[[StoredModelFiles], Any]) -> Any:
        if self._direct is None:
            try:
                return call()
            except UnreachableError as exc:
                return direct(self._fall_back(exc))
        return direct(self._direct)

    def read_bytes(self, name: str) -> bytes:
        future = self._ahead.get(name)
        data: bytes = self._through_loaderd(
            future.result if future else lambda: self._client.read_file(self.uri, name, self._endpoint_url),
            lambda files: files.read_bytes(name))
        return data

    def tensor_index(self) -> dict[str, TensorEntry]:
        index: dict[str, TensorEntry] = self._through_loaderd(
            lambda: {t.name: t for t in self._index_ahead.result().tensors}, lambda files: files.tensor_index())
        return index

    def tensor_source(self, names: Sequence[str], *, background: bool = False) -> TensorSource:
        """Zero-copy views of the daemon's segments holding exactly ``names`` (S3 if it is down);
        what hydraserve.weights.tensor_sources.tensor_source answers for these files."""

        request = AttachRequest(model_uri=self.uri, endpoint_url=self._endpoint_url, tensors=list(names),
                                background=background, pid=None if self._heartbeat else os.getpid(),
                                heartbeat_s=HEARTBEAT_S if self._heartbeat else None)
        source: TensorSource = self._through_loaderd(lambda: self._attach(request),
                                                     lambda files: tensor_source(files, names))
        return source

    def fallback_source(self, names: Sequence[str]) -> TensorSource:
        """``names`` fetched from S3 by this process: the daemon went away while they were
        still arriving (they may be half-written in its segments)."""

        return tensor_source(self._fall_back(UnreachableError("it stopped answering mid-fetch")), names)

    def _attach(self, request: AttachRequest) -> TensorSource:
        lease = self._client.attach(request)
        log.info("loading through loaderd", extra={"loaderd": self._client.url, "lease": lease.lease_id,
                                                   "bytes": lease.bytes_total, "bytes_new": lease.bytes_new})
        source = ShmTensorSource(self._client, lease.lease_id, [s.path for s in lease.segments], lease.tensor_names,
                                 heartbeat_s=request.heartbeat_s)
        self._sources.append(source)
        return source

    def release_leases(self) -> None:
        """Give every loaderd lease back (the worker stops; its mappings stay valid until it
        exits). A pid lease would go when the process does; a heartbeat lease would linger for
        a heartbeat, holding the daemon's memory for nobody."""
        for source in self._sources:
            source.release()


class ShmTensorSource:
    """TensorSource over a loaderd lease: the segments mapped read-only; closing releases it."""

    via = "loaderd"

    def __init__(self, client: LoaderClient, lease_id: str, paths: list[str], names: list[str], *,
                 wait_timeout_s: float | None = None, heartbeat_s: float | None = None) -> None:
        from hydraserve.weights.segment import SegmentReader
        from hydraserve.weights.segment_tensors import DEFAULT_WAIT_S, SegmentTensors

        self._client = client
        self.lease_id = lease_id
        self._tensors = SegmentTensors([SegmentReader(p) for p in paths], describe_writer="loaderd",
                                       wait_timeout_s=wait_timeout_s or DEFAULT_WAIT_S, alive=client.healthy)
        self._names = names
        self._closed = threading.Event()
        self._release_lock = threading.Lock()
        if heartbeat_s is not None:
            threading.Thread(target=self._beat, args=(heartbeat_s / 3,), name="lease-heartbeat", daemon=True).start()

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def get(self, name: str) -> Any:
        return self._tensors.get(name)

    def _beat(self, every_s: float) -> None:
        """Renew the lease while it is held (the daemon drops it a heartbeat after we stop)."""
        while not self._closed.wait(every_s):
            try:
                self._client.renew(self.lease_id)
            except Exception as exc:  # a slow or restarting daemon: our mappings stay valid meanwhile
                log.warning("could not renew loaderd lease %s: %s", self.lease_id, exc)

    def release(self) -> None:
        """Give the lease back once (the heartbeat stops); the mappings stay."""
        with self._release_lock:
            if self._closed.is_set():
                return
            self._closed.set()
        try:
            self._client.release(self.lease_id)
        except Exception as exc:  # the daemon reaps leases of dead pids (and unrenewed ones) anyway
            log.warning("could not release loaderd lease %s: %s", self.lease_id, exc)

    def close(self) -> None:
        self._tensors.close()
        self.release()
