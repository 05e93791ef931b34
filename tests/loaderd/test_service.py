"""The daemon's core without HTTP: fills, dedup, readiness order, budget/LRU, leases, integrity,
peer ranges. Bytes come from local files standing in for S3, resolved and read by the real code
and the same fetch engine (S3 itself runs in test_s3)."""

from __future__ import annotations

import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hydraserve.contracts.loader import AttachRequest, PrefetchRequest, ReleaseRequest
from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.tensors import TensorEntry
from hydraserve.errors import InvalidRequestError, NotFoundError, OverloadedError
from hydraserve.loaderd.service import LoaderConfig, LoaderService
from hydraserve.weights.segment import SegmentFailedError, SegmentReader, model_dir_name

from .conftest import LocalStore, LocalStores, llama_like, write_manifest, write_model

URI = "s3://bucket/model"


class Node:
    """One daemon whose "S3" is local directories: ``URI`` is ``root`` (with a manifest)."""

    def __init__(self, node: str, root: Path, budget: int, *, chunk: int = 4096, strict: bool = False,
                 per_tensor: bool = False) -> None:
        self.root = root
        self.per_tensor = per_tensor
        write_manifest(root, per_tensor=per_tensor)
        self.stores = LocalStores({URI: root})
        self.service = LoaderService(
            LoaderConfig(node_name=node, budget_bytes=budget, concurrency=4, chunk_bytes=chunk,
                         strict_integrity=strict),
            open_model=self.stores)

    def add(self, uri: str, root: Path) -> None:
        write_manifest(root, per_tensor=self.per_tensor)
        self.stores.roots[uri] = root

    @property
    def store(self) -> LocalStore:
        return self.stores(URI, None)

    def tensors(self, uri: str = URI) -> list[TensorEntry]:
        return list(self.stores(uri, None).tensor_index().values())

    def key(self, uri: str) -> str:
        return self.service.model(uri, None).version.key


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "m", llama_like(layers=4), shards=2)


@pytest.fixture
def node(shm_guard: str, model_dir: Path) -> Iterator[Node]:
    n = Node(shm_guard, model_dir, budget=64 << 20)
    yield n
    n.service.close()


def expected_bytes(root: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for f in root.glob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            out[name] = t.contiguous().view(torch.uint8).numpy().tobytes()
    return out


def read_all(lease_segments: list, timeout: float = 10) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for info in lease_segments:
        reader = SegmentReader(info.path)
        for i, slot in enumerate(reader.tensors):
            reader.wait_ready(i, timeout_s=timeout)
            out[slot.name] = bytes(reader.tensor_bytes(i))
        reader.close()
    return out


def wait_done(service: LoaderService) -> None:
    for seg in list(service.registry.segments.values()):
        assert seg.done.wait(10)


def test_whole_sharded_model_is_byte_exact(node: Node) -> None:
    lease = node.service.attach(AttachRequest(model_uri=URI))
    assert read_all(lease.segments) == expected_bytes(node.root)
    wait_done(node.service)
    status = node.service.status()
    (model,) = status.models
    assert model.bytes_complete == model.model_bytes == lease.bytes_total
    assert [s.group for s in lease.segments][:2] == ["embed", "layer.0"]  # streaming order


def test_stage_slice_holds_only_its_tensors(node: Node) -> None:
    stage = StageSpec(index=1, num_stages=2, layer_start=2, layer_end=4, num_layers=4)
    lease = node.service.attach(AttachRequest(model_uri=URI, stage=stage))
    got = read_all(lease.segments)
    want = {k: v for k, v in expected_bytes(node.root).items()
            if "layers.2." in k or "layers.3." in k or k in ("model.norm.weight", "lm_head.weight")}
    assert got == want


def test_duplicate_prefetch_shares_one_download(node: Node) -> None:
    first = node.service.prefetch(PrefetchRequest(model_uri=URI))
    second = node.service.prefetch(PrefetchRequest(model_uri=URI))  # while the first is in flight
    wait_done(node.service)
    third = node.service.attach(AttachRequest(model_uri=URI))
    assert first.bytes_new == first.bytes_total > 0
    assert second.bytes_new == 0 and third.bytes_new == 0
    assert [s.segment_id for s in third.segments] == [s.segment_id for s in first.segments]
    total = sum(r.nbytes for s in node.service.registry.segments.values() for r in s.layout.runs)
    assert node.store.bytes == total  # every byte read exactly once
    assert node.store.calls >= total // 4096


def test_reader_takes_first_layer_while_later_ones_are_held_back(node: Node) -> None:
    gate = threading.Event()
    node.store.gate = gate  # hold back every read that touches a layer-3 tensor
    node.store.held = {(t.file, t.start) for t in node.tensors() if "layers.3." in t.name}
    lease = node.service.prefetch(PrefetchRequest(model_uri=URI))
    layer3 = next(s for s in lease.segments if s.group == "layer.3")
    first = next(s for s in lease.segments if s.group == "embed")
    reader = SegmentReader(first.path)
    try:
        for i in range(len(reader.tensors)):
            reader.wait_ready(i, timeout_s=10)
        held = SegmentReader(layer3.path)
        assert held.flag(0) == 0
        held.close()
    finally:
        reader.close()
        gate.set()
    wait_done(node.service)


def test_eviction_never_touches_a_referenced_segment(shm_guard: str, tmp_path: Path) -> None:
    a = write_model(tmp_path / "a", llama_like(layers=2, seed=1))
    n = Node(shm_guard, a, budget=1)  # replaced below once sizes are known
    try:
        n.service.registry.budget_bytes = 10 << 20
        lease = n.service.attach(AttachRequest(model_uri=URI))
        wait_done(n.service)
        used = n.service.status().used_bytes
        n.service.registry.budget_bytes = used + 4096  # room for nothing else
        n.add("s3://bucket/other", write_model(tmp_path / "b", llama_like(layers=2, seed=2)))
        with pytest.raises(OverloadedError, match="evictable"):
            n.service.prefetch(PrefetchRequest(model_uri="s3://bucket/other"))
        assert all(s.state == "complete" for s in n.service.status().segments)
        held = read_all(lease.segments)  # still intact
        assert held == expected_bytes(a)
        n.service.release(ReleaseRequest(lease_id=lease.lease_id))
        second = n.service.prefetch(PrefetchRequest(model_uri="s3://bucket/other"))
        status = n.service.status()
        assert {s.model_key for s in status.segments} == {second.model_key}
        assert n.service.metrics.evictions._value.get() > 0
        wait_done(n.service)
    finally:
        n.service.close()


def test_lru_evicts_least_recently_used_first(shm_guard: str, tmp_path: Path) -> None:
    now = [1000.0]
    n = Node(shm_guard, write_model(tmp_path / "a", llama_like(layers=2, seed=1)), budget=32 << 20)
    n.service.registry.clock = lambda: now[0]
    try:
        layers = [StageSpec(index=i, num_stages=2, layer_start=i, layer_end=i + 1, num_layers=2) for i in range(2)]
        leases = [n.service.attach(AttachRequest(model_uri=URI, stage=s)) for s in layers]
        wait_done(n.service)
        now[0] = 1001.0
        n.service.release(ReleaseRequest(lease_id=leases[1].lease_id))  # stage 1 last used at 1001
        now[0] = 1002.0
        n.service.release(ReleaseRequest(lease_id=leases[0].lease_id))  # stage 0 last used at 1002
        sizes = {s.group: s.size_bytes for s in n.service.status().segments}
        n.service.registry.budget_bytes = sum(sizes.values()) + 1  # any new bytes force eviction
        n.add("s3://bucket/small", write_model(tmp_path / "b", llama_like(layers=1, hidden=8, vocab=8, seed=3)))
        n.service.prefetch(PrefetchRequest(model_uri="s3://bucket/small"))
        left = {s.group for s in n.service.status().segments if s.model_key != n.key("s3://bucket/small")}
        assert {"embed", "layer.0"} <= left  # stage 0, used more recently, survives
        assert not {"layer.1", "head"} <= left  # stage 1 paid for the room
        assert n.service.status().used_bytes <= n.service.registry.budget_bytes
        wait_done(n.service)
    finally:
        n.service.close()


def test_prefetch_pin_expires_and_dead_reader_is_reaped(shm_guard: str, model_dir: Path) -> None:
    now = [1000.0]
    n = Node(shm_guard, model_dir, budget=64 << 20)
    n.service.registry.clock = lambda: now[0]
    try:
        n.service.prefetch(PrefetchRequest(model_uri=URI, pin_s=30))
        import subprocess
        import sys

        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        n.service.attach(AttachRequest(model_uri=URI, pid=child.pid))
        wait_done(n.service)
        assert n.service.registry.reap() == 1  # the attach of the dead pid
        assert all(s.refcount == 1 for s in n.service.status().segments)
        now[0] += 31
        assert n.service.registry.reap() == 1  # the prefetch pin
        assert all(s.refcount == 0 for s in n.service.status().segments)
    finally:
        n.service.close()


def test_a_prefetch_released_while_filling_stops_downloading(node: Node) -> None:
    """Issue 22 item 8: an abandoned prefetch (its cold start failed or was given up) went on
    downloading for no one. Once no lease holds a segment still filling, its fill stops: no
    more reads, the segment is gone, and the next prefetch fetches it afresh, whole."""
    real_read = node.store.read_into
    gate, reads = threading.Event(), []

    def slow_read(file: str, start: int, out: memoryview, cancel: object = None) -> None:
        reads.append(start)
        gate.wait(10)  # every read waits for the test
        real_read(file, start, out)

    node.store.read_into = slow_read  # type: ignore[method-assign]
    lease = node.service.prefetch(PrefetchRequest(model_uri=URI, pin_s=60))
    deadline = time.monotonic() + 5
    while len(reads) < 4 and time.monotonic() < deadline:  # the 4 streams each hold a read
        time.sleep(0.01)
    node.service.release(ReleaseRequest(lease_id=lease.lease_id))
    gate.set()
    wait_done(node.service)
    time.sleep(0.2)
    started = len(reads)
    total_chunks = sum(t.nbytes for t in node.tensors()) // 4096  # reads of 4 KiB at most: at least this many
    assert started <= 8 < total_chunks, (started, total_chunks)  # the reads under way, no more
    assert not node.service.registry.segments and node.service.metrics.abandoned._value.get() >= 1
    node.store.read_into = real_read  # type: ignore[method-assign]
    again = node.service.attach(AttachRequest(model_uri=URI))
    assert read_all(again.segments) == expected_bytes(node.root)


def test_bad_requests(node: Node) -> None:
    with pytest.raises(InvalidRequestError, match="unknown tensors"):
        node.service.prefetch(PrefetchRequest(model_uri=URI, tensors=["nope"]))
    with pytest.raises(NotFoundError):
        node.service.release(ReleaseRequest(lease_id="missing"))


def test_a_failed_read_fails_its_segment_once_and_the_next_attach_refetches(node: Node) -> None:
    """The engine never retries a read: the store does (S3: its one retry budget, test_s3), so
    a read that fails for good fails its segment once, and the next attach fetches it afresh."""
    real_read = node.store.read_into
    failed = []

    def fail_once(file: str, start: int, out: memoryview, cancel: object = None) -> None:
        if not failed:
            failed.append(start)
            raise ConnectionError("injected: the store gave up")
        real_read(file, start, out)

    node.store.read_into = fail_once  # type: ignore[method-assign]
    first = node.service.attach(AttachRequest(model_uri=URI))
    wait_done(node.service)
    assert [s.state for s in node.service.status().segments].count("failed") == 1
    assert node.service.metrics.errors.labels(source="s3", kind="ConnectionError")._value.get() == 1
    node.service.release(ReleaseRequest(lease_id=first.lease_id))
    again = node.service.attach(AttachRequest(model_uri=URI))
    assert read_all(again.segments) == expected_bytes(node.root)


def test_corrupted_file_is_detected_and_refetched_clean(shm_guard: str, model_dir: Path) -> None:
    n = Node(shm_guard, model_dir, budget=64 << 20, strict=True)
    try:
        victim = sorted(model_dir.glob("*.safetensors"))[1]
        good = victim.read_bytes()
        bad = bytearray(good)
        bad[-5] ^= 0xFF
        victim.write_bytes(bytes(bad))  # same size, content no longer matches the manifest
        lease = n.service.attach(AttachRequest(model_uri=URI))
        wait_done(n.service)
        failed = [s for s in n.service.status().segments if s.state == "failed"]
        assert failed
        retired = {s.segment_id: s for s in n.service.registry.retired.values()}  # failed: out of the table
        assert {f.segment_id for f in failed} <= set(retired)
        for f in failed:
            assert any(r.file == victim.name for r in retired[f.segment_id].layout.runs)
        for info in lease.segments:
            if info.segment_id in {f.segment_id for f in failed}:
                reader = SegmentReader(info.path)
                with pytest.raises(SegmentFailedError):
                    reader.wait_ready(len(reader.tensors) - 1, timeout_s=5)
                reader.close()
        assert n.service.metrics.integrity_failures._value.get() == 1
        n.service.release(ReleaseRequest(lease_id=lease.lease_id))
        victim.write_bytes(good)  # the store is repaired: the next attach refetches clean bytes
        again = n.service.attach(AttachRequest(model_uri=URI))
        assert read_all(again.segments) == expected_bytes(model_dir)
        wait_done(n.service)
    finally:
        n.service.close()


def _corrupt(path: Path, at: int) -> bytes:
    good = path.read_bytes()
    bad = bytearray(good)
    bad[at] ^= 0xFF
    path.write_bytes(bytes(bad))  # same size, content no longer matches the manifest
    return good


@pytest.mark.parametrize("strict", [False, True])
def test_per_tensor_hashes_never_publish_a_corrupted_tensor(shm_guard: str, model_dir: Path, strict: bool) -> None:
    """Format 2 manifest: the corrupted tensor is never marked ready (its reader gets an error,
    never bad bytes) while every other tensor, of its segment too, is served verified."""
    n = Node(shm_guard, model_dir, budget=64 << 20, per_tensor=True, strict=strict)
    try:
        victim = sorted(model_dir.glob("*.safetensors"))[0]
        spec = next(t for t in n.tensors() if t.file == victim.name and ".layers.1." in t.name)
        want = expected_bytes(model_dir)
        good = _corrupt(victim, spec.start + 3)
        published: list[int] = []
        lease = n.service.attach(AttachRequest(model_uri=URI))
        bad_info = next(i for i in lease.segments if i.group == "layer.1")
        reader = SegmentReader(bad_info.path)
        pos = reader.position[spec.name]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and reader.state == 0:
            published.append(reader.flag(pos))  # watched while the fill runs: never 1
            time.sleep(0.0005)
        assert 1 not in published and reader.flag(pos) == 2
        with pytest.raises(SegmentFailedError):
            reader.wait_ready(pos, timeout_s=5)
        reader.close()
        wait_done(n.service)
        states = {s.group: s.state for s in n.service.status().segments}
        assert states.pop("layer.1") == "failed" and set(states.values()) == {"complete"}
        got = read_all([i for i in lease.segments if i.group != "layer.1"])
        assert got == {k: want[k] for k in got}
        reader = SegmentReader(bad_info.path)
        for i, slot in enumerate(reader.tensors):  # the segment's other tensors are verified and served
            if slot.name != spec.name:
                reader.wait_ready(i, timeout_s=1)
                assert bytes(reader.tensor_bytes(i)) == want[slot.name]
        reader.close()
        assert n.service.metrics.integrity_failures._value.get() == 1
        assert n.service.metrics.errors.labels(source="verify", kind="IntegrityError")._value.get() == 2
        n.service.release(ReleaseRequest(lease_id=lease.lease_id))
        victim.write_bytes(good)
        again = n.service.attach(AttachRequest(model_uri=URI))
        assert read_all(again.segments) == want
    finally:
        n.service.close()


def test_a_tensor_corrupted_in_transit_is_refetched_and_served(shm_guard: str, model_dir: Path) -> None:
    n = Node(shm_guard, model_dir, budget=64 << 20, per_tensor=True)
    try:
        spec = next(t for t in n.tensors() if ".layers.0." in t.name)
        real_read = n.store.read_into
        flipped = []

        def read_once_bad(file: str, start: int, out: memoryview, cancel: object = None) -> None:
            real_read(file, start, out)
            if not flipped and file == spec.file and start <= spec.start < start + len(out):
                flipped.append(1)
                out[spec.start - start] ^= 1

        n.store.read_into = read_once_bad  # type: ignore[method-assign]
        lease = n.service.attach(AttachRequest(model_uri=URI))
        assert read_all(lease.segments) == expected_bytes(model_dir)
        wait_done(n.service)
        assert flipped and {s.state for s in n.service.status().segments} == {"complete"}
        assert n.service.metrics.integrity_failures._value.get() == 0
    finally:
        n.service.close()


def test_stage_slice_is_verified_per_tensor(shm_guard: str, model_dir: Path) -> None:
    """A stage slice holds part of a file (never hashable whole): with per-tensor hashes a
    corrupted tensor in it is still caught."""
    n = Node(shm_guard, model_dir, budget=64 << 20, per_tensor=True)
    try:
        spec = next(t for t in n.tensors() if ".layers.0." in t.name)
        _corrupt(model_dir / spec.file, spec.start)
        stage = StageSpec(index=0, num_stages=2, layer_start=0, layer_end=2, num_layers=4)
        lease = n.service.prefetch(PrefetchRequest(model_uri=URI, stage=stage))
        wait_done(n.service)
        states = {s.group: s.state for s in n.service.status().segments}
        # the failed group is gone at once (nobody was reading it: its memory is freed), the rest kept
        assert states == {"embed": "complete", "layer.1": "complete"}
        info = next(i for i in lease.segments if i.group == "layer.0")
        assert not os.path.exists(info.path)
        assert n.service.metrics.integrity_failures._value.get() == 1
    finally:
        n.service.close()


def test_peer_range_served_only_when_held(node: Node) -> None:
    lease = node.service.attach(AttachRequest(model_uri=URI))
    wait_done(node.service)
    seg = node.service.registry.segments[lease.segments[1].segment_id]
    run = seg.layout.runs[0]
    data = node.service.read_range(lease.model_key, run.file, run.file_start, run.file_end)
    with open(node.root / run.file, "rb") as fh:
        fh.seek(run.file_start)
        assert data == fh.read(run.nbytes)
    with pytest.raises(NotFoundError):
        node.service.read_range(lease.model_key, run.file, 0, 8)  # the header is never held
    with pytest.raises(NotFoundError):
        node.service.read_range("otherkey", run.file, run.file_start, run.file_end)


def test_peer_fetch_reads_from_the_peer_not_s3(shm_guard: str, model_dir: Path) -> None:
    from hydraserve.auth import NodeKeys
    from hydraserve.loaderd.client import PeerReader
    from hydraserve.loaderd.daemon import LoaderDaemon

    token = "p" * 24
    asker = Node(shm_guard, model_dir, budget=64 << 20)
    holder = LoaderDaemon(LoaderConfig(node_name=shm_guard + "a", budget_bytes=64 << 20, chunk_bytes=4096),
                          token, open_model=LocalStores({URI: model_dir})).start()
    keys = NodeKeys.derive(token, asker.service.config.node_name)
    asker.service._peer_source = lambda url, key: PeerReader(url, keys, key)
    try:
        holder.service.attach(AttachRequest(model_uri=URI))
        wait_done(holder.service)
        lease = asker.service.attach(AttachRequest(model_uri=URI, peers=[holder.url]))
        assert read_all(lease.segments) == expected_bytes(model_dir)
        wait_done(asker.service)
        assert asker.store.calls == 0  # nothing from "S3"
        assert asker.service.metrics.bytes_fetched.labels(source="peer")._value.get() == lease.bytes_total
        # a peer that holds nothing (or is gone) -> S3
        fresh = Node(shm_guard + "c", write_model(model_dir.parent / "o", llama_like(layers=1, seed=9)),
                     budget=64 << 20)
        fresh.service._peer_source = lambda url, key: PeerReader(url, keys, key)
        try:
            got = fresh.service.attach(AttachRequest(model_uri=URI, peers=[holder.url, "http://127.0.0.1:9"]))
            assert read_all(got.segments) == expected_bytes(fresh.root)
            assert fresh.store.calls > 0
            wait_done(fresh.service)
        finally:
            fresh.service.close()
    finally:
        asker.service.close()
        holder.stop()


def test_second_daemon_with_the_same_node_name_is_refused(node: Node, model_dir: Path) -> None:
    lease = node.service.prefetch(PrefetchRequest(model_uri=URI))
    with pytest.raises(InvalidRequestError, match="already runs"):
        Node(node.service.config.node_name, model_dir, budget=1 << 20)
    assert all(os.path.exists(s.path) for s in lease.segments)  # not unlinked as "stale"
    wait_done(node.service)


def test_stale_segments_of_a_crashed_run_are_removed(shm_guard: str, model_dir: Path) -> None:
    stale = f"/dev/shm/hsld-{shm_guard}-deadbeef-00000000"
    with open(stale, "wb") as fh:
        fh.write(b"x")
    n = Node(shm_guard, model_dir, budget=1 << 20)
    try:
        assert not os.path.exists(stale)
    finally:
        n.service.close()
    assert not os.path.exists(f"/dev/shm/hsld-{shm_guard}.lock")


def test_each_models_segments_land_in_a_directory_of_their_own(node: Node, model_dir: Path, tmp_path: Path) -> None:
    """What a Kubernetes function pod mounts is its model's directory: no segment of another
    model is there. The directories are the daemon's own (0700) and go when it closes."""
    other = f"s3://bucket/other-{uuid.uuid4().hex[:8]}"
    node.add(other, write_model(tmp_path / "other", llama_like(layers=2, seed=1)))
    mine = node.service.prefetch(PrefetchRequest(model_uri=URI))
    theirs = node.service.prefetch(PrefetchRequest(model_uri=other))
    dirs = {uri: {os.path.dirname(s.path) for s in lease.segments} for uri, lease in ((URI, mine), (other, theirs))}
    assert dirs == {URI: {f"/dev/shm/{model_dir_name(URI)}"}, other: {f"/dev/shm/{model_dir_name(other)}"}}
    assert model_dir_name(URI + "/") == model_dir_name(URI)  # one model, however its URI is written
    for [directory] in dirs.values():
        st = os.lstat(directory)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    wait_done(node.service)
    node.service.close()
    assert not any(os.path.exists(d) for [d] in dirs.values())


def test_a_model_directory_that_is_not_the_daemons_own_is_not_used(node: Node, tmp_path: Path) -> None:
    """In a shared /dev/shm another user could make a model's directory (or a symlink) first, to
    read or replace its segments: the daemon refuses to put segments there."""
    uri = f"s3://bucket/planted-{uuid.uuid4().hex[:8]}"
    node.add(uri, write_model(tmp_path / "planted", llama_like(layers=2)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted = f"/dev/shm/{model_dir_name(uri)}"
    os.symlink(elsewhere, planted)
    try:
        with pytest.raises(InvalidRequestError, match="not a directory of this daemon's own"):
            node.service.prefetch(PrefetchRequest(model_uri=uri))
        assert list(elsewhere.iterdir()) == [] and not node.service.registry.segments
    finally:
        os.unlink(planted)
