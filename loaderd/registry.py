"""The node's segments: creation under a byte budget, leases (reference counts), LRU eviction.

Used by hydraserve.loaderd.service. A lease is one holder's reference on a set of segments:
prefetch takes one that expires after ``pin_s`` (so bytes fetched before the worker exists are
not evicted before it attaches), attach takes one that lives until release or until the
reader's pid dies, or, for a reader in another PID namespace (a pod, whose pid means nothing
here), until it stops renewing its heartbeat. A segment with any lease, or still filling, is
never evicted or rewritten.

Where segments live: ``<root>/<model_dir_name(uri)>/hsld-<node>-<segment>-<gen>``, one
directory per model (0700, ours: checked before use, never followed through a symlink), so a
function pod on Kubernetes mounts its own model's directory only. A directory is made on the
model's first segment and removed, if empty, when the daemon closes; directories several
daemons share (the embedded deployment's nodes, all in /dev/shm) survive a sibling's removal:
creation retries once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hydraserve.errors import InvalidRequestError, OverloadedError
from hydraserve.weights.segment import (
    MODEL_DIR_PREFIX,
    STATE_COMPLETE,
    STATE_FAILED,
    SegmentLayout,
    SegmentWriter,
    model_dir_name,
)

log = logging.getLogger(__name__)

NODE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")
SEGMENT_PREFIX = "hsld-"


@dataclass
class Segment:
    """One group of one model in shared memory, and what the daemon knows about its fill."""

    segment_id: str
    model_uri: str
    model_key: str
    group: str
    order: int
    layout: SegmentLayout
    writer: SegmentWriter
    state: str = "filling"  # filling | complete | failed
    refs: int = 0
    created: float = 0.0
    last_used: float = 0.0
    tensors_ready: int = 0
    bytes_ready: int = 0
    error: str | None = None
    attempts: int = 1
    done: threading.Event = field(default_factory=threading.Event)
    abandon: Callable[[], None] | None = None  # stops its fill (set while one runs)

    @property
    def size(self) -> int:
        return self.layout.size


@dataclass
class Lease:
    lease_id: str
    segments: list[Segment]
    expires_at: float | None
    pid: int | None
    owner: str | None = None  # who took it (a worker token's subject): only they may release it
    heartbeat_s: float | None = None  # a reader's lease that expires unless renewed this often


def segment_id_for(model_key: str, group: str, tensor_names: Iterable[str]) -> str:
    """Stable id of a group's segment: same model version and tensors -> same segment."""
    digest = hashlib.sha256()
    for part in (model_key, group, *sorted(tensor_names)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def node_segment_files(root: str, node_name: str) -> list[str]:
    """Paths of the segments a daemon with this node name left under ``root`` (for its next
    start, and for checks that nothing is left behind); also those an earlier release left
    directly in the root."""
    prefix = f"{SEGMENT_PREFIX}{node_name}-"
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    found = [os.path.join(root, name) for name in names if name.startswith(prefix)]
    for name in names:
        if not name.startswith(MODEL_DIR_PREFIX):
            continue
        model_dir = os.path.join(root, name)
        try:
            found += [os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.startswith(prefix)]
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return found


def remove_if_empty(directory: str) -> None:
    """rmdir, quietly: another daemon's segments (or a sibling's removal) may be there first."""
    try:
        os.rmdir(directory)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    """Thread-safe table of segments and leases with a node-wide byte budget."""

    def __init__(self, node_name: str, budget_bytes: int, *, shm_dir: str = "/dev/shm",
                 clock: Callable[[], float] = time.time,
                 on_evict: Callable[[Segment], None] | None = None) -> None:
        if not NODE_NAME.fullmatch(node_name):
            raise InvalidRequestError(f"node name {node_name!r} must match {NODE_NAME.pattern}")
        if budget_bytes <= 0:
            raise InvalidRequestError("budget must be positive")
        self.node_name = node_name
        self.budget_bytes = budget_bytes
        self.shm_dir = shm_dir
        self.clock = clock
        self.lock = threading.RLock()
        self.segments: dict[str, Segment] = {}
        self.leases: dict[str, Lease] = {}
        self.retired: dict[str, Segment] = {}  # failed but still leased: unlinked on release
        self._abandoned: list[Segment] = []  # filling, no lease left: take_abandoned() hands them out
        self._on_evict = on_evict
        self.evictions = 0
        self._lock_fd: int | None = None
        self._lock_path = ""
        self._dirs: set[str] = set()  # the model directories this daemon used (removed if empty at close)
        room = self._shm_room()
        if room is not None and room < budget_bytes:
            log.warning("the budget is over what %s can hold: segments are created only where it has room",
                        shm_dir, extra={"budget_bytes": budget_bytes, "tmpfs_free_bytes": room})

    @property
    def prefix(self) -> str:
        return f"{SEGMENT_PREFIX}{self.node_name}-"

    def path_for(self, segment_id: str, model_uri: str) -> str:
        """A fresh file name in the model's directory: a refetched group never reuses the path of
        a failed segment."""
        return os.path.join(self.shm_dir, model_dir_name(model_uri), f"{self.prefix}{segment_id}-{uuid.uuid4().hex[:8]}")

    def model_dir(self, model_uri: str) -> str:
        """The model's directory, made if missing (0700). One found there must be a real
        directory of ours that nobody else may write (in a shared /dev/shm another user could
        have made it, or a symlink, to read or replace the segments): else refused."""
        path = os.path.join(self.shm_dir, model_dir_name(model_uri))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise InvalidRequestError(f"{path} is not a directory of this daemon's own (a symlink, "
                                          "another user's, or writable by others): not used") from None
        self._dirs.add(path)
        return path

    def _create(self, layout: SegmentLayout, segment_id: str, model_uri: str) -> SegmentWriter:
        """The segment's file; a directory a sibling daemon removed meanwhile is made again."""
        for attempt in (0, 1):
            self.model_dir(model_uri)
            try:
                return SegmentWriter(layout, self.path_for(segment_id, model_uri))
            except FileNotFoundError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def lock_node(self) -> None:
        """Hold /dev/shm/hsld-<node>.lock so a second daemon with this node name refuses to start
        (it would unlink the first one's segments as stale)."""
        path = os.path.join(self.shm_dir, f"{SEGMENT_PREFIX}{self.node_name}.lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InvalidRequestError(f"another loaderd already runs with node name {self.node_name!r}") from None
        self._lock_fd, self._lock_path = fd, path

    def remove_stale(self) -> int:
        """Unlink segments a previous run of this node's daemon left behind (crash)."""
        removed = 0
        for path in node_segment_files(self.shm_dir, self.node_name):
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                pass
            if os.path.dirname(path) != self.shm_dir:
                remove_if_empty(os.path.dirname(path))
        return removed

    @property
    def used_bytes(self) -> int:
        return sum(s.size for s in self.segments.values()) + sum(s.size for s in self.retired.values())

    def acquire(self, model_uri: str, model_key: str,
                groups: list[tuple[str, int, str, SegmentLayout]], *, pin_s: float | None,
                pid: int | None, owner: str | None = None,
                heartbeat_s: float | None = None) -> tuple[Lease, list[Segment], list[Segment]]:
        """Lease the segments of these groups, creating the missing ones (evicting LRU first).

        ``groups`` holds (segment_id, order, group name, layout). Returns the lease, all
        segments in order, and the ones created now (the caller fetches those).
        """
        now = self.clock()
        with self.lock:
            self.reap(now)
            wanted: list[Segment | None] = []
            missing: list[tuple[str, int, str, SegmentLayout]] = []
            for seg_id, order, group, layout in groups:
                seg = self.segments.get(seg_id)
                if seg is not None and seg.state == "failed":
                    self._retire(seg)
                    seg = None
                wanted.append(seg)
                if seg is None:
                    missing.append((seg_id, order, group, layout))
            need = sum(layout.size for *_, layout in missing)
            protect = {seg_id for seg_id, *_ in groups}
            self._make_room(need, protect)
            created: list[Segment] = []
            try:
                for seg_id, order, group, layout in missing:
                    writer = self._create(layout, seg_id, model_uri)
                    seg = Segment(seg_id, model_uri, model_key, group, order, layout, writer,
                                  created=now, last_used=now)
                    self.segments[seg_id] = seg
                    created.append(seg)
            except InvalidRequestError:
                for seg in created:
                    self._drop(seg)
                raise
            except OSError as exc:
                for seg in created:
                    self._drop(seg)
                raise OverloadedError(f"cannot create shared memory segment: {exc}",
                                      retry_after_s=5) from exc
            by_id = {s.segment_id: s for s in created}
            segs = [w if w is not None else by_id[g[0]] for w, g in zip(wanted, groups, strict=True)]
            hold_s = heartbeat_s if heartbeat_s is not None else pin_s
            lease = Lease(uuid.uuid4().hex, segs, None if hold_s is None else now + hold_s, pid, owner, heartbeat_s)
            for seg in segs:
                seg.refs += 1
                seg.last_used = now
            self.leases[lease.lease_id] = lease
            return lease, segs, created

    def _make_room(self, need: int, protect: set[str]) -> None:
        """Evict unleased segments, least recently used first, until ``need`` bytes fit both the
        budget and the tmpfs (OverloadedError when they cannot)."""
        within_budget = self.budget_bytes - self.used_bytes
        room = self._shm_room()
        free = within_budget if room is None else min(within_budget, room)
        if need <= free:
            return
        candidates = sorted((s for s in self.segments.values()
                             if s.refs == 0 and s.state in ("complete", "failed") and s.segment_id not in protect),
                            key=lambda s: s.last_used)
        evictable = sum(s.size for s in candidates)
        if need > free + evictable:
            raise OverloadedError(
                f"budget {self.budget_bytes} B: need {need} B, {free} B free and only "
                f"{evictable} B evictable (the rest is in use or still filling)"
                + (f"; {self.shm_dir} has room for {room} B more" if room is not None and room == free else ""),
                retry_after_s=5)
        for seg in candidates:
            if need <= self._free_bytes():
                break
            log.info("evicting segment", extra={"segment": seg.segment_id, "group": seg.group,
                                                "model": seg.model_uri, "bytes": seg.size})
            self._drop(seg)
            self.evictions += 1
            if self._on_evict is not None:
                self._on_evict(seg)

    def _free_bytes(self) -> int:
        free = self.budget_bytes - self.used_bytes
        room = self._shm_room()
        return free if room is None else min(free, room)

    def _shm_room(self) -> int | None:
        """Bytes the tmpfs can still take for new segments: its free space less what our sparse
        segments have yet to fill (a write past a full tmpfs is SIGBUS, not an error: loaderd
        died of it when /dev/shm filled, issue 22 item 7). None where it cannot be read."""
        try:
            st = os.statvfs(self.shm_dir)
        except OSError:
            return None
        pending = 0
        for seg in [*self.segments.values(), *self.retired.values()]:
            if seg.writer.path is None:
                continue
            try:
                pending += max(0, seg.size - os.stat(seg.writer.path).st_blocks * 512)
            except OSError:
                continue
        return st.f_bavail * st.f_frsize - pending

    def _drop(self, seg: Segment) -> None:
        if self.segments.get(seg.segment_id) is seg:
            del self.segments[seg.segment_id]
        self.retired.pop(seg.writer.path or "", None)
        seg.writer.unlink()
        seg.writer.close()

    def _retire(self, seg: Segment) -> None:
        """Take a failed segment out of the table; unlink it once no lease holds it."""
        del self.segments[seg.segment_id]
        if seg.refs > 0:
            self.retired[seg.writer.path or ""] = seg
        else:
            self._drop(seg)

    def release(self, lease_id: str, owner: str | None = None) -> bool:
        """Drop a lease; False if unknown (already released or expired) or, with ``owner``,
        taken by someone else."""
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is None or (owner is not None and lease.owner != owner):
                return False
            del self.leases[lease_id]
            self._unref(lease)
            return True

    def renew(self, lease_id: str, owner: str | None = None) -> bool:
        """Extend a heartbeat lease by its heartbeat; False if unknown (expired: its reader was
        too late), not a heartbeat lease, or, with ``owner``, taken by someone else."""
        with self.lock:
            lease = self.leases.get(lease_id)
            if lease is None or lease.heartbeat_s is None or (owner is not None and lease.owner != owner):
                return False
            lease.expires_at = self.clock() + lease.heartbeat_s
            return True

    def _unref(self, lease: Lease) -> None:
        now = self.clock()
        for seg in lease.segments:
            seg.refs -= 1
            seg.last_used = now
            if seg.refs == 0 and (seg.writer.path or "") in self.retired:
                self._drop(seg)
            elif seg.refs == 0 and seg.state == "filling" and seg.abandon is not None:
                self._abandoned.append(seg)  # stopped by the caller, outside the lock

    def take_abandoned(self) -> list[Segment]:
        """Segments still filling that no lease holds any more, once each: their fills should
        stop (issue 22 item 8: an abandoned prefetch went on downloading)."""
        with self.lock:
            abandoned, self._abandoned = [s for s in self._abandoned if s.refs == 0 and s.state == "filling"], []
        return abandoned

    def reap(self, now: float | None = None) -> int:
        """Drop leases whose pin expired or whose reader process is gone."""
        now = self.clock() if now is None else now
        dropped = 0
        with self.lock:
            for lease in list(self.leases.values()):
                expired = lease.expires_at is not None and now >= lease.expires_at
                dead = lease.pid is not None and not _pid_alive(lease.pid)
                if expired or dead:
                    del self.leases[lease.lease_id]
                    self._unref(lease)
                    dropped += 1
        return dropped

    def touch(self, segs: Iterable[Segment]) -> None:
        now = self.clock()
        with self.lock:
            for seg in segs:
                seg.last_used = now

    def mark(self, seg: Segment, state: str, error: str | None = None) -> None:
        """Record a fill outcome (the fetch engine calls this; the writer state is set too). A
        failed segment frees its memory at once: prefetch leases on it (nobody reads through
        them) are dropped and it is retired (unlinked when its last reader lets go)."""
        with self.lock:
            seg.state = state
            seg.error = error
            seg.writer.set_state(STATE_COMPLETE if state == "complete" else STATE_FAILED)
            if state == "failed":
                prefetches = [lz for lz in self.leases.values()  # pinned, no reader: nobody waits on them
                              if lz.pid is None and lz.heartbeat_s is None and lz.expires_at is not None
                              and seg in lz.segments]
                for lease in prefetches:
                    del self.leases[lease.lease_id]
                    self._unref(lease)
                if self.segments.get(seg.segment_id) is seg:
                    self._retire(seg)
            seg.done.set()  # last: whoever waits sees the outcome settled (a failed one already freed)

    def pinned_bytes(self) -> int:
        with self.lock:
            return sum(s.size for s in self.segments.values() if s.refs > 0 or s.state not in ("complete", "failed"))

    def close(self) -> None:
        """Unlink every segment (daemon shutdown): readers keep their existing mappings."""
        with self.lock:
            for seg in [*self.segments.values(), *self.retired.values()]:
                if seg.state not in ("complete", "failed"):
                    seg.writer.set_state(STATE_FAILED)  # wake readers still waiting on it
                self._drop(seg)
            self.leases.clear()
            for directory in self._dirs:
                remove_if_empty(directory)
            self._dirs.clear()
            if self._lock_fd is not None:
                os.unlink(self._lock_path)
                os.close(self._lock_fd)
                self._lock_fd = None
