"""The shared-memory segment format: one file under /dev/shm holding a group of tensors.

Segments of one model live in a directory of their own under loaderd's root
(``model_dir_name``), so a Kubernetes function pod mounts its own model's segments and no
other's (provider/knative/service.py mounts exactly that directory).

Written by loaderd (SegmentWriter) and by the runtime's direct-S3 path (the same writer over
anonymous memory, filled by the same fetch engine); read by workers (SegmentReader: os.open +
read-only mmap, never multiprocessing.SharedMemory, whose resource tracker would unlink the
daemon's segment when the reader exits: docs/LOADERD.md). It lives below loaderd so a reader
needs nothing of the daemon. No torch here.

Layout (little endian)::

    0   magic b"HSLDSEG1"
    8   u32 version (1)          12  u32 state (0 filling, 1 complete, 2 failed)
    16  u64 total size           24  u32 tensor count      28  u32 index length
    32  u64 data offset          40  u64 flags offset      48  u64 index offset
    64  one readiness byte per tensor (0 pending, 1 ready, 2 failed)
    ..  JSON index {"model_key", "group", "tensors": [{name, dtype, shape, offset, nbytes,
        file, file_start}]}
    ..  data, from a 4096-aligned offset; tensors keep their file alignment modulo 64

A tensor's readiness byte is set only after all of its bytes are written, and the state word
is set to complete only after every tensor is ready (and verified): a reader that sees 1 can
take a zero-copy view. Complete segments are never written again.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from hydraserve.contracts.tensors import TensorEntry
from hydraserve.weights.s3_uri import parse_s3_uri

MAGIC = b"HSLDSEG1"
VERSION = 1
HEADER = struct.Struct("<8sIIQIIQQQ8x")  # 64 bytes
STATE_FILLING, STATE_COMPLETE, STATE_FAILED = 0, 1, 2
FLAG_PENDING, FLAG_READY, FLAG_FAILED = 0, 1, 2
PAGE = 4096
ALIGN = 64
MODEL_DIR_PREFIX = "hydraserve-model-"


def model_dir_name(model_uri: str) -> str:
    """The directory (one path segment, under loaderd's root) holding a model's segments: a hash
    of the validated, canonical URI (``s3://b/m`` and ``s3://b/m/`` are one model), so no name a
    user writes can reach outside the root. Keyed on the URI, not the version: a function's pod
    template is written (``kn hydra create``) before any version of its model is known."""
    canonical = str(parse_s3_uri(model_uri))  # InvalidRequestError for anything that is no s3:// URI
    return MODEL_DIR_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Run:
    """A contiguous byte span of one model file, stored contiguously in the segment."""

    file: str
    file_start: int
    file_end: int
    offset: int
    tensors: tuple[int, ...]  # indexes into SegmentLayout.tensors

    @property
    def nbytes(self) -> int:
        return self.file_end - self.file_start


@dataclass
class SegmentLayout:
    """Placement of a group's tensors in one segment; computed once, written into the header."""

    model_key: str
    group: str
    tensors: list[TensorEntry]  # file order
    offsets: list[int]  # where each tensor starts, from the start of the segment
    runs: list[Run]
    data_offset: int
    size: int
    index_bytes: bytes = field(repr=False, default=b"")
    sha256: list[str | None] = field(default_factory=list)  # expected hash per tensor slot

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _align_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def plan_layout(model_key: str, group: str, tensors: Sequence[TensorEntry],
                sha256: Mapping[str, str] | None = None) -> SegmentLayout:
    """Lay out tensors in file order; file-adjacent tensors share one run (one ranged read).
    ``sha256`` (tensor name -> digest of its bytes, from the push manifest) is checked as they land."""
    ordered = sorted(tensors, key=lambda s: (s.file, s.start))
    # Index offsets depend on the data offset, which depends on the index length: the index
    # is sized with placeholder offsets first (offsets are fixed-width below).
    cursor = 0
    runs: list[tuple[str, int, int, int, list[int]]] = []
    rel: list[int] = []
    for i, spec in enumerate(ordered):
        if spec.end < spec.start:
            raise ValueError(f"tensor {spec.name}: bad range {spec.start}..{spec.end}")
        if runs and runs[-1][0] == spec.file and runs[-1][2] == spec.start:
            f, fs, _, off, members = runs[-1]
            runs[-1] = (f, fs, spec.end, off, [*members, i])
            rel.append(off + spec.start - fs)
            cursor = off + spec.end - fs
            continue
        off = _align_up(cursor, ALIGN) + spec.start % ALIGN
        runs.append((spec.file, spec.start, spec.end, off, [i]))
        rel.append(off)
        cursor = off + spec.end - spec.start
    n = len(ordered)
    index_offset = _align_up(HEADER.size + n, 8)

    def index_json(data_offset: int) -> bytes:
        entries = [
            {"name": s.name, "dtype": s.dtype, "shape": list(s.shape),
             "offset": f"{data_offset + rel[i]:016d}", "nbytes": s.end - s.start,
             "file": s.file, "file_start": s.start}
            for i, s in enumerate(ordered)
        ]
        return json.dumps({"model_key": model_key, "group": group, "tensors": entries},
                          separators=(",", ":")).encode()

    data_offset = _align_up(index_offset + len(index_json(0)), PAGE)
    index_bytes = index_json(data_offset)
    run_objs = [Run(f, fs, fe, data_offset + off, tuple(m)) for f, fs, fe, off, m in runs]
    size = max(data_offset + cursor, data_offset + 1)
    return SegmentLayout(model_key, group, ordered, [data_offset + r for r in rel], run_objs, data_offset, size,
                         index_bytes, [(sha256 or {}).get(s.name) for s in ordered])


class SegmentWriter:
    """Creates a segment (a 0600 file under /dev/shm, or anonymous memory) and fills it."""

    def __init__(self, layout: SegmentLayout, path: str | None) -> None:
        self.layout = layout
        self.path = path
        if path is None:
            self._mm = mmap.mmap(-1, layout.size)
        else:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, layout.size)  # sparse on tmpfs: pages appear as bytes land
                self._mm = mmap.mmap(fd, layout.size)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
            os.close(fd)
        n = len(layout.tensors)
        index_offset = _align_up(HEADER.size + n, 8)
        self._mm[index_offset:index_offset + len(layout.index_bytes)] = layout.index_bytes
        HEADER.pack_into(self._mm, 0, MAGIC, VERSION, STATE_FILLING, layout.size, n,
                         len(layout.index_bytes), layout.data_offset, HEADER.size, index_offset)
        self.view = memoryview(self._mm)

    @property
    def buffer(self) -> mmap.mmap:
        """The writable mapping (the runtime's fallback reads its own anonymous segments)."""
        return self._mm

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Copy bytes to an absolute segment offset (only while filling)."""
        self.view[offset:offset + len(data)] = data

    def mark_ready(self, tensor_index: int) -> None:
        """Publish one tensor (after all its bytes are written)."""
        self._mm[HEADER.size + tensor_index] = FLAG_READY

    def mark_failed(self, tensor_index: int) -> None:
        """This tensor's bytes could not be verified: readers waiting on it get an error."""
        self._mm[HEADER.size + tensor_index] = FLAG_FAILED

    @property
    def state(self) -> int:
        return int(struct.unpack_from("<I", self._mm, 12)[0])

    def is_ready(self, tensor_index: int) -> bool:
        return self._mm[HEADER.size + tensor_index] == FLAG_READY

    def set_state(self, state: int) -> None:
        """Complete (all tensors ready and verified) or failed (readers must not use it)."""
        if state == STATE_FAILED:
            for i in range(len(self.layout.tensors)):
                if self._mm[HEADER.size + i] != FLAG_READY:
                    self._mm[HEADER.size + i] = FLAG_FAILED
        struct.pack_into("<I", self._mm, 12, state)

    def unpublish(self) -> None:
        """Take every tensor back (bytes failed verification and will be refetched)."""
        for i in range(len(self.layout.tensors)):
            self._mm[HEADER.size + i] = FLAG_PENDING

    def close(self) -> None:
        self.view.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # tensors still view the mapping (fallback readers); it goes when they do

    def unlink(self) -> None:
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class SegmentFailedError(RuntimeError):
    """The daemon gave up on this segment (fetch error or integrity failure)."""


class SegmentReader:
    """Read-only view of a segment: its index, readiness, and zero-copy tensor bytes."""

    def __init__(self, path: str | None = None, *, buffer: mmap.mmap | None = None) -> None:
        if buffer is not None:
            self._mm = buffer
            self._owns = False
        else:
            if path is None:
                raise ValueError("path or buffer required")
            fd = os.open(path, os.O_RDONLY)
            try:
                self._mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._owns = True
        (magic, version, _state, size, _n, index_len, self.data_offset, flags_offset,
         index_offset) = HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{path}: not a loaderd segment (magic {magic!r}, version {version})")
        if size != len(self._mm):
            raise ValueError(f"{path}: header says {size} bytes, file has {len(self._mm)}")
        self._flags = flags_offset
        index = json.loads(bytes(self._mm[index_offset:index_offset + index_len]))
        self.model_key: str = index["model_key"]
        self.group: str = index["group"]
        self.tensors = [TensorEntry(t["name"], t["dtype"], tuple(t["shape"]), t["file"], t["file_start"],
                                    t["file_start"] + t["nbytes"]) for t in index["tensors"]]
        self.offsets = [int(t["offset"]) for t in index["tensors"]]
        self.position = {t.name: i for i, t in enumerate(self.tensors)}
        self.view = memoryview(self._mm)

    @property
    def state(self) -> int:
        return int(struct.unpack_from("<I", self._mm, 12)[0])

    def flag(self, i: int) -> int:
        return self._mm[self._flags + i]

    def wait_ready(self, i: int, timeout_s: float | None = None) -> None:
        """Block until tensor i's bytes have landed; raises on failure or timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pause = 0.0002
        while True:
            flag = self._mm[self._flags + i]
            if flag == FLAG_READY:
                return
            if flag == FLAG_FAILED or self.state == STATE_FAILED:
                raise SegmentFailedError(f"segment {self.group}: tensor {self.tensors[i].name} failed")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"tensor {self.tensors[i].name} not ready after {timeout_s} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def tensor_bytes(self, i: int) -> memoryview:
        return self.view[self.offsets[i]:self.offsets[i] + self.tensors[i].nbytes]

    def close(self) -> None:
        self.view.release()
        if self._owns:
            self._mm.close()
