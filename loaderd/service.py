"""loaderd's core: prefetch / attach / release / status / peer reads over the registry and engine.

Called by hydraserve.loaderd.api (HTTP) and directly by tests. It resolves a model version once
(hydraserve.loaderd.models; revalidated cheaply), picks the slice with the stage slicer, leases its segments (creating and fetching only the missing ones, so a
second prefetch of held or in-flight bytes downloads nothing), checks integrity (per tensor as
it lands when the manifest has per-tensor hashes, else per file when all of a file's bytes are
resident: the manifest's sha256, else an MD5 ETag), and reports residency.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hydraserve.contracts.loader import (
    AttachRequest,
    FileRange,
    LeaseResponse,
    LoaderStatus,
    ModelIndexResponse,
    ModelResidency,
    PrefetchRequest,
    ReleaseRequest,
    ReleaseResponse,
    SegmentInfo,
    SliceRequest,
)
from hydraserve.errors import (
    ForbiddenError,
    HydraError,
    IntegrityError,
    InvalidRequestError,
    NotFoundError,
)
from hydraserve.loaderd.file_check import FileCheck, file_check
from hydraserve.loaderd.metrics import LoaderMetrics
from hydraserve.loaderd.models import DEFAULT_REVALIDATE_S, HeldModel, ModelCache, Opener, S3Opener
from hydraserve.loaderd.registry import Registry, Segment, segment_id_for
from hydraserve.weights.fetch import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CONCURRENCY,
    DEFAULT_MIN_CHUNK_BYTES,
    FetchCancelled,
    FetchEngine,
    Fill,
    RangeReader,
)
from hydraserve.weights.model_version import ModelVersion
from hydraserve.weights.retry import DEFAULT_BUDGET_S
from hydraserve.weights.segment import plan_layout

log = logging.getLogger(__name__)

MAX_SMALL_FILE = 32 << 20  # tokenizer.json of big vocabularies is a few MB

PeerFactory = Callable[[str, str], RangeReader]  # (peer loaderd URL, model key) -> its reader


@dataclass
class LoaderConfig:
    """Settings of one daemon (one node)."""

    node_name: str
    budget_bytes: int
    concurrency: int = DEFAULT_CONCURRENCY
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    min_chunk_bytes: int = DEFAULT_MIN_CHUNK_BYTES
    retry_budget_s: float = DEFAULT_BUDGET_S  # how long one S3 operation keeps retrying
    revalidate_s: float = DEFAULT_REVALIDATE_S  # a model version is rechecked at most this often
    shm_dir: str = "/dev/shm"
    endpoint_url: str | None = None
    allowed_endpoint_urls: tuple[str, ...] = ()  # S3 endpoints a request may name besides endpoint_url
    strict_integrity: bool = False  # old manifests: hold whole files until their sha256 matches
    max_refetch: int = 1  # rereads of a tensor whose sha256 did not match before it fails
    etag_check: bool = True  # no manifest: check whole files against MD5 ETags (not for SSE-KMS)


class LoaderService:
    """The daemon's state and operations (thread-safe)."""

    def __init__(self, config: LoaderConfig, *, open_model: Opener | None = None,
                 peer_source: PeerFactory | None = None, metrics: LoaderMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._endpoints = {u.rstrip("/") for u in (config.endpoint_url, *config.allowed_endpoint_urls) if u}
        self.metrics = metrics or LoaderMetrics()
        self.registry = Registry(config.node_name, config.budget_bytes, shm_dir=config.shm_dir,
                                 clock=clock, on_evict=lambda s: self.metrics.evictions.inc())
        self.registry.lock_node()
        stale = self.registry.remove_stale()
        if stale:
            log.info("removed %d stale segments of a previous run", stale)
        self.engine = FetchEngine(concurrency=config.concurrency, chunk_bytes=config.chunk_bytes,
                                  min_chunk_bytes=config.min_chunk_bytes, observer=self.metrics)
        self.opener = S3Opener(config.retry_budget_s, on_retry=lambda kind: self.metrics.on_error("s3", kind))
        self.models = ModelCache(open_model or self.opener, revalidate_s=config.revalidate_s)
        if open_model is None:
            self.opener.client(config.endpoint_url)  # made now: the first prefetch should not pay for it
        self._peer_source = peer_source
        self._verified: set[tuple[str, str]] = set()  # (model key, file) whose sha256 matched
        self._small_files: dict[tuple[str, str], bytes] = {}  # (model key, name) -> bytes
        self._lock = threading.Lock()
        self._settle_lock = threading.Lock()

    # -- model resolution -------------------------------------------------------------------

    def model(self, uri: str, endpoint_url: str | None, *, validate: bool = False) -> HeldModel:
        """The model's current version: resolved once, then revalidated cheaply (models.py). A
        request may name only the S3 endpoints this daemon was configured for (else a token
        holder could make it fetch from anywhere)."""
        if endpoint_url and endpoint_url.rstrip("/") not in self._endpoints:
            raise ForbiddenError(f"S3 endpoint {endpoint_url!r} is not one this daemon was configured for",
                                 param="endpoint_url")
        return self.models.get(uri, endpoint_url or self.config.endpoint_url, validate=validate)

    def index(self, uri: str, endpoint_url: str | None) -> ModelIndexResponse:
        """Every tensor of the model with its byte range: what a worker slices its stage from."""
        version = self.model(uri, endpoint_url).version
        return ModelIndexResponse(model_key=version.key, tensors=list(version.tensors.values()))

    # -- operations -------------------------------------------------------------------------

    def prefetch(self, req: PrefetchRequest) -> LeaseResponse:
        return self._lease(req, pin_s=req.pin_s, pid=None)

    def attach(self, req: AttachRequest, owner: str | None = None) -> LeaseResponse:
        return self._lease(req, pin_s=None, pid=req.pid, owner=owner, heartbeat_s=req.heartbeat_s)

    def release(self, req: ReleaseRequest, owner: str | None = None) -> ReleaseResponse:
        """Drop a lease; with ``owner``, only one that owner took (else it is unknown to it)."""
        released = self.registry.release(req.lease_id, owner=owner)
        self._stop_abandoned()
        if not released:
            raise NotFoundError(f"no lease {req.lease_id!r} (released already or expired)",
                                param="lease_id")
        self._update_gauges()
        return ReleaseResponse(released=True)

    def renew(self, req: ReleaseRequest, owner: str | None = None) -> ReleaseResponse:
        """A heartbeat: the lease lives another heartbeat_s (404 once it expired)."""
        if not self.registry.renew(req.lease_id, owner=owner):
            raise NotFoundError(f"no heartbeat lease {req.lease_id!r} (released, expired, or tied to a pid)",
                                param="lease_id")
        return ReleaseResponse(released=False)

    def _lease(self, req: SliceRequest, *, pin_s: float | None, pid: int | None,
               owner: str | None = None, heartbeat_s: float | None = None) -> LeaseResponse:
        held = self.model(req.model_uri, req.endpoint_url, validate=True)
        version = held.version
        entries = version.select(req.stage, req.tensors)
        if not entries:
            raise InvalidRequestError("the slice selects no tensors", param="stage")
        groups = []
        for order, group, members in version.groups(entries):
            seg_id = segment_id_for(version.key, group, (m.name for m in members))
            groups.append((seg_id, order, group, plan_layout(version.key, group, members, version.tensor_sha256)))
        lease, segs, created = self.registry.acquire(req.model_uri, version.key, groups, pin_s=pin_s, pid=pid,
                                                     owner=owner, heartbeat_s=heartbeat_s)
        if created:
            self._start_fill(held, created, req.peers, req.background)
        bytes_new = sum(s.layout.tensor_bytes for s in created)
        log.info("lease", extra={"lease": lease.lease_id, "model": req.model_uri, "groups": len(segs),
                                 "bytes_new": bytes_new, "pinned_s": pin_s, "pid": pid})
        self._update_gauges()
        return LeaseResponse(lease_id=lease.lease_id, model_key=version.key,
                             segments=[self._info(s) for s in segs],
                             bytes_total=sum(s.layout.tensor_bytes for s in segs), bytes_new=bytes_new,
                             tensor_names=[t.name for t in entries])

    def _start_fill(self, held: HeldModel, segs: list[Segment], peers: list[str], background: bool) -> None:
        sources: list[RangeReader] = []
        if self._peer_source is not None:
            sources.extend(self._peer_source(p, held.version.key) for p in peers)
        sources.append(held.files)
        strict = self.config.strict_integrity
        # Tensors with a manifest hash (format 2) are verified one by one before they are
        # published, so strict mode only has to hold back segments without them.
        fills = [(seg.order, Fill(seg.layout, seg.writer, sources, on_done=functools.partial(self._on_fill_done, held, seg),
                                  on_tensor=functools.partial(self._on_tensor, seg),
                                  defer_publish=strict and any(h is None for h in seg.layout.sha256),
                                  max_refetch=self.config.max_refetch))
                 for seg in segs]
        for seg, (_, fill) in zip(segs, fills, strict=True):
            seg.abandon = functools.partial(self.engine.cancel, fill, "no lease holds the segment any more")
        self.engine.submit(fills, background=background)

    def _stop_abandoned(self) -> None:
        """Stop the fills of segments nobody holds any more (a cold start that failed or was
        given up, a pin that expired): their bytes would be fetched for no one."""
        for seg in self.registry.take_abandoned():
            log.info("segment abandoned while filling: fetch stopped", extra={"segment": seg.segment_id,
                                                                            "model": seg.model_uri})
            self.metrics.abandoned.inc()
            if seg.abandon is not None:
                seg.abandon()

    def _on_tensor(self, seg: Segment, fill: Fill, i: int) -> None:
        with self.registry.lock:
            seg.tensors_ready += 1
            seg.bytes_ready += seg.layout.tensors[i].nbytes

    def _on_fill_done(self, held: HeldModel, seg: Segment, fill: Fill, exc: BaseException | None) -> None:
        elapsed = time.monotonic() - fill.started
        seg.abandon = None
        if isinstance(exc, FetchCancelled):  # nobody holds it: gone, not a failure
            self.registry.mark(seg, "failed", "abandoned")
            return
        if exc is not None:
            self.metrics.failures.inc()
            if isinstance(exc, IntegrityError):  # a tensor's bytes never matched its sha256
                self.metrics.integrity_failures.inc()
                self.models.forget(seg.model_uri)
            self.registry.mark(seg, "failed", f"{type(exc).__name__}: {exc}")
            log.error("segment failed", extra={"segment": seg.segment_id, "group": seg.group,
                                               "model": seg.model_uri, "error": str(exc)})
            self._settle(held)  # strict mode: segments waiting for this file's hash move on
            self._update_gauges()
            return
        self.metrics.fill_seconds.observe(elapsed)
        log.info("segment filled", extra={"segment": seg.segment_id, "group": seg.group,
                                          "bytes": seg.layout.tensor_bytes, "seconds": round(elapsed, 3),
                                          "verify_seconds": round(fill.verify_seconds, 3)})
        with self.registry.lock:
            seg.state = "verifying"
        self._settle(held)
        self._update_gauges()

    # -- integrity --------------------------------------------------------------------------

    def _settle(self, held: HeldModel) -> None:
        """Hash files that are now wholly resident (manifest sha256, else an MD5 ETag: see
        file_check); complete (publish) segments whose files are verified, or cannot be verified
        on this node (only part of them is held or in flight); fail the segments of a file that
        does not match."""
        index = held.version
        with self._settle_lock:
            with self.registry.lock:
                segs = [s for s in self.registry.segments.values() if s.model_key == index.key]
            bad: dict[str, FileCheck] = {}
            for file in sorted({r.file for s in segs for r in s.layout.runs}):
                check = self._file_check(index, file)
                if check is None or (index.key, file) in self._verified:
                    continue
                meta = index.files[file]
                runs = self._covering_runs(segs, file, meta.data_start, meta.size, {"verifying", "complete"})
                if runs is None:
                    continue
                pieces: list[bytes | memoryview] = [held.files.header_bytes(file)]
                pieces += (seg.writer.view[lo:hi] for seg, lo, hi in runs)
                if check.matches(pieces):
                    self._verified.add((index.key, file))
                    log.info("file verified", extra={"model": held.uri, "file": file, "against": check.what})
                else:
                    bad[file] = check
            for file, check in bad.items():
                self.metrics.integrity_failures.inc()
                hint = "" if check.algorithm == "sha256" else (
                    " (objects encrypted with SSE-KMS/SSE-C have ETags that are not MD5s: "
                    "run loaderd with --no-etag-check)")
                log.error("integrity check failed: %s/%s does not match %s%s", held.uri, file, check.what, hint,
                          extra={"model": held.uri, "file": file})
                for seg in segs:
                    if seg.state != "failed" and any(r.file == file for r in seg.layout.runs):
                        seg.writer.unpublish()
                        self.registry.mark(seg, "failed", f"{file} does not match {check.what}{hint}")
            if bad:
                self.models.forget(held.uri)
            for seg in segs:
                if seg.state != "verifying":
                    continue
                waiting = self.config.strict_integrity and any(
                    self._file_check(index, f) is not None
                    and (index.key, f) not in self._verified
                    and self._covering_runs(segs, f, index.files[f].data_start, index.files[f].size,
                                            {"filling", "verifying", "complete"}) is not None
                    for f in {r.file for r in seg.layout.runs})
                if waiting:
                    continue  # published once the rest of its file lands and verifies
                if self.config.strict_integrity and any(h is None for h in seg.layout.sha256):
                    for i in range(len(seg.layout.tensors)):
                        seg.writer.mark_ready(i)
                self.registry.mark(seg, "complete")
                self.metrics.segments_completed.inc()

    def _file_check(self, index: ModelVersion, file: str) -> FileCheck | None:
        return file_check(index.files[file], use_etag=self.config.etag_check)

    @staticmethod
    def _covering_runs(segs: list[Segment], file: str, data_start: int, size: int,
                       states: set[str]) -> list[tuple[Segment, int, int]] | None:
        """Segment slices that tile [data_start, size) of a file, or None if there is a gap."""
        runs = sorted(((r, s) for s in segs if s.state in states for r in s.layout.runs if r.file == file),
                      key=lambda rs: rs[0].file_start)
        out: list[tuple[Segment, int, int]] = []
        cursor = data_start
        for run, seg in runs:
            if run.file_start > cursor:
                return None
            if run.file_end <= cursor:
                continue
            out.append((seg, run.offset + cursor - run.file_start, run.offset + run.nbytes))
            cursor = run.file_end
        return out if cursor >= size else None

    # -- small files (config, tokenizer) for workers -----------------------------------------

    def read_file(self, uri: str, endpoint_url: str | None, name: str) -> bytes:
        """A small non-weight file of the model (config.json, tokenizer.json, ...), cached per
        model version: workers then need no S3 client (boto3 import + client ~0.3 s of start-up)."""
        if name.endswith(".safetensors"):
            raise InvalidRequestError("weights are served through attach, not /v1/file", param="name")
        held = self.model(uri, endpoint_url)
        key = (held.version.key, name)
        with self._lock:
            data = self._small_files.get(key)
        if data is None:
            data = held.files.read_bytes(name)  # a file it lacks: MissingObjectError, a 404
            if len(data) > MAX_SMALL_FILE:
                raise InvalidRequestError(f"{name} is {len(data)} B; /v1/file serves at most {MAX_SMALL_FILE} B",
                                          param="name")
            with self._lock:
                self._small_files[key] = data
        return data

    # -- peers ------------------------------------------------------------------------------

    def read_range(self, model_key: str, file: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a model file if a ready run of this node holds them all."""
        with self.registry.lock:
            for seg in self.registry.segments.values():
                if seg.model_key != model_key or seg.state == "failed":
                    continue
                for run in seg.layout.runs:
                    if run.file == file and run.file_start <= start and end <= run.file_end:
                        if all(seg.writer.is_ready(i) for i in run.tensors
                               if seg.layout.tensors[i].start < end and seg.layout.tensors[i].end > start):
                            off = run.offset + start - run.file_start
                            seg.last_used = self.registry.clock()
                            data = bytes(seg.writer.view[off:off + end - start])
                            self.metrics.peer_served.inc(len(data))
                            return data
        raise NotFoundError(f"range {file}[{start}:{end}] of {model_key} not held here")

    # -- status -----------------------------------------------------------------------------

    def _info(self, seg: Segment) -> SegmentInfo:
        return SegmentInfo(segment_id=seg.segment_id, path=seg.writer.path or "", model_key=seg.model_key,
                           group=seg.group, order=seg.order,
                           state="filling" if seg.state == "verifying" else seg.state,  # type: ignore[arg-type]
                           size_bytes=seg.size, tensor_bytes=seg.layout.tensor_bytes,
                           bytes_ready=seg.bytes_ready, tensors=len(seg.layout.tensors),
                           tensors_ready=seg.tensors_ready, refcount=seg.refs, last_used=seg.last_used)

    def status(self) -> LoaderStatus:
        self.registry.reap()
        with self.registry.lock:
            segs = sorted([*self.registry.segments.values(), *self.registry.retired.values()],  # retired: failed, still read
                          key=lambda s: (s.model_key, s.order))
            infos = [self._info(s) for s in segs]
            models: dict[str, ModelResidency] = {}
            for seg in segs:
                if seg.state == "failed":
                    continue
                held = self.models.by_key(seg.model_key)
                res = models.setdefault(seg.model_key, ModelResidency(
                    model_uri=seg.model_uri, model_key=seg.model_key,
                    model_bytes=held.version.model_bytes if held else 0, bytes_complete=0, bytes_filling=0,
                    groups_complete=[], groups_filling=[], ranges=[]))
                done = seg.state == "complete"
                if done:
                    res.bytes_complete += seg.layout.tensor_bytes
                    res.groups_complete.append(seg.group)
                else:
                    res.bytes_filling += seg.layout.tensor_bytes
                    res.groups_filling.append(seg.group)
                res.ranges.extend(FileRange(file=r.file, start=r.file_start, end=r.file_end, complete=done)
                                  for r in seg.layout.runs)
            used = self.registry.used_bytes
        return LoaderStatus(node_name=self.config.node_name, budget_bytes=self.config.budget_bytes,
                            used_bytes=used, pinned_bytes=self.registry.pinned_bytes(),
                            inflight_chunks=self.engine.inflight, segments=infos, models=list(models.values()))

    def reap(self) -> int:
        """Drop expired pins and leases of dead readers (the daemon calls this every second)."""
        dropped = self.registry.reap()
        self._stop_abandoned()
        if dropped:
            self._update_gauges()
        return dropped

    def _update_gauges(self) -> None:
        with self.registry.lock:
            self.metrics.resident_bytes.set(self.registry.used_bytes)
            self.metrics.leases.set(len(self.registry.leases))
            counts = {"filling": 0, "complete": 0, "failed": 0, "verifying": 0}
            for seg in self.registry.segments.values():
                counts[seg.state] = counts.get(seg.state, 0) + 1
        for state, n in counts.items():
            self.metrics.segments.labels(state=state).set(n)

    def close(self) -> None:
        self.engine.close()
        self.registry.close()


def describe(exc: BaseException) -> str:
    """A short reason for logs and errors (HydraError's message, else the type and text)."""
    return exc.message if isinstance(exc, HydraError) else f"{type(exc).__name__}: {exc}"
