"""loaderd against a real S3 server (moto over HTTP): the `hydraserve loaderd` process, byte-exact
whole models, stage slices and shards, S3 killed and restarted mid-fetch, connections cut
mid-response, a corrupted object, and the runtime falling back to S3 when no daemon answers."""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hydraserve.auth import new_token_file
from hydraserve.contracts.loader import AttachRequest, PrefetchRequest
from hydraserve.contracts.model import ModelManifest
from hydraserve.contracts.stage import StageSpec
from hydraserve.errors import (
    IntegrityError,
    InvalidRequestError,
    MissingObjectError,
    NotFoundError,
    TemporaryError,
)
from hydraserve.loaderd.daemon import LoaderDaemon, spawn_loaderd
from hydraserve.loaderd.service import LoaderConfig
from hydraserve.runtime.loader_files import LoaderModelFiles
from hydraserve.testing.faults import CuttingProxy
from hydraserve.weights.local import LocalTensorSource
from hydraserve.weights.push import push_model
from hydraserve.weights.segment import SegmentFailedError, SegmentReader
from hydraserve.weights.tensor_sources import tensor_source
from tests.conftest import remove_node_segments

from .conftest import llama_like, write_model

BUCKET = "loaderd-tests"


def push(s3: Any, local: Path, name: str) -> str:
    """Push a model (manifest included) and make the server reload it after a restart."""
    uri = f"s3://{BUCKET}/{name}"
    manifest = push_model(local, uri, progress=False, create_bucket=True, client=s3.client())
    for path in local.iterdir():
        s3.remember(BUCKET, f"{name}/{path.name}", path)
    mpath = local.parent / f"{name}-manifest.json"
    mpath.write_text(manifest.model_dump_json())
    s3.remember(BUCKET, f"{name}/hydraserve-manifest.json", mpath)
    return uri


def expected(local: Path) -> dict[str, torch.Tensor]:
    src = LocalTensorSource(local)
    return {n: src.get(n) for n in src.tensor_names()}


def open_through(uri: str, url: str, token: str, stage: StageSpec | None = None, **kw: Any) -> Any:
    """A worker's tensor source for ``stage`` (default: the whole model) through the daemon at ``url``."""
    files = LoaderModelFiles(uri, url, token, **kw)
    return tensor_source(files, files.stage_tensor_names(stage))


def assert_same(source: Any, want: dict[str, torch.Tensor], names: list[str] | None = None) -> None:
    names = names if names is not None else list(want)
    assert sorted(source.tensor_names()) == sorted(names)
    for n in names:
        got = source.get(n)
        assert got.dtype == want[n].dtype and got.shape == want[n].shape
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.bool else got, want[n]), n


@pytest.fixture(scope="module")
def models(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    from hydraserve.modeltools.tiny import TinySpec, make_tiny_model

    root = tmp_path_factory.mktemp("s3models")
    tiny = make_tiny_model(root / "tiny", TinySpec(arch="llama", kv_heads=2))
    sharded = make_tiny_model(root / "sharded", TinySpec(arch="llama", layers=4, shard_size="100KB"))
    big = write_model(root / "big", llama_like(layers=6, hidden=128, vocab=1024))
    out = {}
    for name, path in (("tiny", tiny), ("sharded", sharded), ("big", big)):
        out[name] = (push(s3_server, path, f"{name}-{uuid.uuid4().hex[:6]}"), path)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    return out


@pytest.fixture
def s3_env(s3_server: Any) -> Iterator[dict[str, str]]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.client_env().items():
            mp.setenv(k, v)
        yield s3_server.client_env()


def daemon(node: str, **kw: Any) -> LoaderDaemon:
    cfg = LoaderConfig(node_name=node, budget_bytes=256 << 20, **kw)
    return LoaderDaemon(cfg, "s" * 32).start()


def test_cli_daemon_serves_whole_sharded_and_stage_slices(s3_server: Any, models: dict, shm_guard: str,
                                                          tmp_path: Path) -> None:
    token, token_file = new_token_file(tmp_path)
    from hydraserve.processes import free_port

    d = spawn_loaderd(port=free_port(), node_name=shm_guard, budget_bytes=64 << 20, token=token,
                      token_file=token_file, endpoint_url=s3_server.endpoint_url, env=s3_server.client_env(),
                      log_path=tmp_path / "loaderd.log")
    try:
        uri, local = models["tiny"]
        source = open_through(uri, d.url, d.token)
        assert getattr(source, "via", "") == "loaderd"
        assert_same(source, expected(local))
        for info in d.client().status().segments:
            assert stat.S_IMODE(os.stat(info.path).st_mode) == 0o600
        source.close()

        uri, local = models["sharded"]
        want = expected(local)
        stage = StageSpec(index=1, num_stages=2, layer_start=2, layer_end=4, num_layers=4)
        source = open_through(uri, d.url, d.token, stage)
        names = [n for n in want if ".layers.2." in n or ".layers.3." in n or n in ("model.norm.weight", "lm_head.weight")]
        assert_same(source, want, names)
        whole = open_through(uri, d.url, d.token)
        assert_same(whole, want)
        status = wait_complete(d.client())
        model = next(m for m in status.models if m.model_uri == uri)
        assert model.bytes_complete == model.model_bytes
        source.close()
        whole.close()
        # a byte mover: the daemon served all this without importing torch (or safetensors' torch half)
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "torch/_C" not in maps
    finally:
        assert d.stop() == 0
    log = (tmp_path / "loaderd.log").read_text()
    assert s3_server.credentials.secret_access_key not in log and token not in log


def test_s3_killed_and_restarted_mid_fetch(s3_server: Any, s3_env: dict, models: dict, shm_guard: str) -> None:
    uri, local = models["big"]
    d = daemon(shm_guard, concurrency=1, chunk_bytes=4096, retry_budget_s=30)
    try:
        lease = d.client().prefetch(PrefetchRequest(model_uri=uri))
        first = SegmentReader(lease.segments[0].path)
        first.wait_ready(0, timeout_s=30)
        s3_server.kill()
        time.sleep(0.5)
        s3_server.start()
        first.close()
        source = open_through(uri, d.url, d.token)
        assert_same(source, expected(local))
        source.close()
        errors = sum(s.value for m in d.service.metrics.errors.collect() for s in m.samples
                     if s.name.endswith("_total"))
        assert errors + s3_retries(d) > 0, "the kill did not interrupt the fetch"
        assert all(s.state == "complete" for s in wait_complete(d.client()).segments)
    finally:
        if not s3_server.running:
            s3_server.start()
        d.stop()


def wait_complete(client: Any, timeout_s: float = 30) -> Any:
    """Status once no segment is filling (readers may finish before the state word turns)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.status()
        if all(s.state != "filling" for s in status.segments) or time.monotonic() > deadline:
            return status
        time.sleep(0.02)


def s3_retries(d: LoaderDaemon) -> int:
    return int(d.service.opener.client(d.service.config.endpoint_url).retries)


def test_connections_cut_mid_response_are_retried_by_the_s3_client_and_counted(
        s3_server: Any, s3_env: dict, models: dict, shm_guard: str) -> None:
    """The S3 client is the one layer that retries: cut streams resume, every retry is counted
    in the daemon's metrics, and the bytes come out exact."""
    uri, local = models["big"]
    proxy = CuttingProxy(s3_server.port, cut_after=100_000, cuts=1000)  # every longer response
    d = daemon(shm_guard, endpoint_url=proxy.endpoint_url)
    try:
        source = open_through(uri, d.url, d.token)
        assert_same(source, expected(local))
        source.close()
        retries = s3_retries(d)
        counted = sum(s.value for m in d.service.metrics.errors.collect() for s in m.samples
                      if s.name.endswith("_total") and s.labels.get("source") == "s3")
        assert retries >= 1 and counted == retries
        assert all(s.state == "complete" for s in wait_complete(d.client()).segments)
    finally:
        d.stop()
        proxy.close()


def downgrade_manifest(s3: Any, uri: str) -> None:
    """Replace a pushed manifest by its format 1 form (sha256 per file only), as older pushes wrote."""
    key = uri[len(f"s3://{BUCKET}/"):] + "/hydraserve-manifest.json"
    manifest = ModelManifest.model_validate_json(bytes(s3.client().get_object_bytes(BUCKET, key)))
    old = manifest.model_copy(update={"format_version": 1, "files": [
        f.model_copy(update={"tensors": None, "header_sha256": None}) for f in manifest.files]})
    data = old.model_dump_json(exclude={"files": {"__all__": {"tensors", "header_sha256"}}}).encode()
    ModelManifest.model_validate_json(data)
    s3.client().put_bytes(BUCKET, key, data, content_type="application/json")


@pytest.mark.parametrize("strict", [True, False])
def test_corrupted_object_is_detected_and_not_served_old_manifest(s3_server: Any, s3_env: dict, shm_guard: str,
                                                                  tmp_path: Path, strict: bool) -> None:
    """Format 1 manifest (sha256 per file): the whole file's hash decides."""
    local = write_model(tmp_path / "m", llama_like(layers=2, seed=5))
    uri = push(s3_server, local, f"corrupt-{uuid.uuid4().hex[:6]}")
    downgrade_manifest(s3_server, uri)
    bad = tmp_path / "bad.safetensors"
    raw = bytearray((local / "model.safetensors").read_bytes())
    raw[-3] ^= 0x55  # same size, different content (in the last tensor)
    bad.write_bytes(bytes(raw))
    key = uri[len(f"s3://{BUCKET}/"):] + "/model.safetensors"
    s3_server.client().put_file(BUCKET, key, bad)
    d = daemon(shm_guard, strict_integrity=strict)
    try:
        lease = d.client().attach(AttachRequest(model_uri=uri))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(s.state != "failed" for s in d.client().status().segments):
            time.sleep(0.02)  # the file's segments are failed one after another
        status = d.client().status()
        assert {s.state for s in status.segments} == {"failed"}
        assert d.service.metrics.integrity_failures._value.get() == 1
        for info in lease.segments:
            reader = SegmentReader(info.path)
            if strict:  # nothing was ever published
                assert all(reader.flag(i) != 1 for i in range(len(reader.tensors)))
            with pytest.raises(SegmentFailedError):
                reader.wait_ready(len(reader.tensors) - 1, timeout_s=5)
            reader.close()
        d.client().release(lease.lease_id)
        s3_server.client().put_file(BUCKET, key, local / "model.safetensors")  # repaired
        source = open_through(uri, d.url, d.token)
        assert_same(source, expected(local))
        source.close()
    finally:
        d.stop()


def test_corrupted_tensor_is_never_served_with_a_per_tensor_manifest(s3_server: Any, s3_env: dict, shm_guard: str,
                                                                    tmp_path: Path) -> None:
    """Format 2 manifest (as pushed today): only the corrupted tensor is held back (its reader
    gets an error, never bad bytes); every other tensor is verified and served."""
    local = write_model(tmp_path / "m", llama_like(layers=2, seed=5))
    uri = push(s3_server, local, f"corrupt2-{uuid.uuid4().hex[:6]}")
    bad = tmp_path / "bad.safetensors"
    raw = bytearray((local / "model.safetensors").read_bytes())
    raw[-3] ^= 0x55  # same size, different content (in the last tensor)
    bad.write_bytes(bytes(raw))
    key = uri[len(f"s3://{BUCKET}/"):] + "/model.safetensors"
    s3_server.client().put_file(BUCKET, key, bad)
    want = expected(local)
    d = daemon(shm_guard)
    try:
        lease = d.client().attach(AttachRequest(model_uri=uri))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(s.state == "filling" for s in d.client().status().segments):
            time.sleep(0.02)
        states = [s.state for s in d.client().status().segments]
        assert states.count("failed") == 1 and states.count("complete") == len(states) - 1
        assert d.service.metrics.integrity_failures._value.get() == 1
        bad_names = []
        for info in lease.segments:
            reader = SegmentReader(info.path)
            for i, slot in enumerate(reader.tensors):
                if reader.flag(i) == 1:
                    got = bytes(reader.tensor_bytes(i))
                    assert got == want[slot.name].contiguous().view(torch.uint8).numpy().tobytes(), slot.name
                else:
                    with pytest.raises(SegmentFailedError):
                        reader.wait_ready(i, timeout_s=5)
                    bad_names.append(slot.name)
            reader.close()
        assert len(bad_names) == 1
        d.client().release(lease.lease_id)
        s3_server.client().put_file(BUCKET, key, local / "model.safetensors")  # repaired
        source = open_through(uri, d.url, d.token)
        assert_same(source, want)
        source.close()
    finally:
        d.stop()


def test_object_size_changed_since_push_is_refused(s3_server: Any, s3_env: dict, shm_guard: str,
                                                   tmp_path: Path) -> None:
    local = write_model(tmp_path / "m", llama_like(layers=1, seed=6))
    uri = push(s3_server, local, f"resized-{uuid.uuid4().hex[:6]}")
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes((local / "model.safetensors").read_bytes() + b"\0" * 16)
    s3_server.client().put_file(BUCKET, uri[len(f"s3://{BUCKET}/"):] + "/model.safetensors", longer)
    d = daemon(shm_guard)
    try:
        with pytest.raises(IntegrityError, match="manifest says") as info:
            d.client().prefetch(PrefetchRequest(model_uri=uri))
        assert info.value.retryable  # across HTTP too: a repaired object will do
        assert d.client().status().segments == []
    finally:
        d.stop()


def test_header_not_matching_the_manifest_is_refused(s3_server: Any, s3_env: dict, shm_guard: str,
                                                    tmp_path: Path) -> None:
    """A tensor's hash covers its bytes, not how they are read: the header (dtype, shape, range)
    is checked against the manifest before any tensor is fetched."""
    local = write_model(tmp_path / "m", llama_like(layers=1, seed=6))
    uri = push(s3_server, local, f"header-{uuid.uuid4().hex[:6]}")
    key = uri[len(f"s3://{BUCKET}/"):] + "/hydraserve-manifest.json"
    manifest = ModelManifest.model_validate_json(bytes(s3_server.client().get_object_bytes(BUCKET, key)))
    forged = manifest.model_copy(update={"files": [
        f.model_copy(update={"header_sha256": "0" * 64}) if f.header_sha256 else f for f in manifest.files]})
    s3_server.client().put_bytes(BUCKET, key, forged.model_dump_json().encode(), content_type="application/json")
    d = daemon(shm_guard)
    try:
        with pytest.raises(IntegrityError, match="header does not match") as info:
            d.client().prefetch(PrefetchRequest(model_uri=uri))
        assert info.value.retryable
        assert d.client().status().segments == []
    finally:
        d.stop()


def test_bad_uris_get_clear_errors(s3_env: dict, shm_guard: str) -> None:
    d = daemon(shm_guard)
    try:
        with pytest.raises(InvalidRequestError, match=r"URI|bucket|key"):
            d.client().prefetch(PrefetchRequest(model_uri="s3://a/../../dev/shm"))
        with pytest.raises(InvalidRequestError):
            d.client().prefetch(PrefetchRequest(model_uri="file:///etc/passwd"))
        with pytest.raises(MissingObjectError, match=r"does not exist|no model files"):
            d.client().prefetch(PrefetchRequest(model_uri=f"s3://{BUCKET}/missing-{uuid.uuid4().hex[:6]}"))
    finally:
        d.stop()


def test_runtime_falls_back_to_s3_when_no_daemon_answers(s3_env: dict, models: dict,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from hydraserve.processes import free_port

    uri, local = models["sharded"]
    reasons: list[str] = []
    with caplog.at_level(logging.WARNING, logger="hydraserve.runtime.loader_files"):
        source = open_through(uri, f"http://127.0.0.1:{free_port()}", "x" * 32, on_fallback=reasons.append)
    try:
        assert getattr(source, "via", "") == "s3"
        assert reasons and "did not answer" in reasons[0]
        assert any("falling back to direct S3" in r.getMessage() for r in caplog.records)
        assert_same(source, expected(local))
    finally:
        source.close()


def test_repushed_model_is_not_served_stale(s3_server: Any, s3_env: dict, shm_guard: str, tmp_path: Path) -> None:
    name = f"repush-{uuid.uuid4().hex[:6]}"
    first = write_model(tmp_path / "v1", llama_like(layers=1, seed=11))
    second = write_model(tmp_path / "v2", llama_like(layers=1, seed=12))
    uri = push(s3_server, first, name)
    d = daemon(shm_guard)
    try:
        source = open_through(uri, d.url, d.token)
        assert_same(source, expected(first))
        source.close()
        push(s3_server, second, name)
        again = open_through(uri, d.url, d.token)
        assert_same(again, expected(second))
        again.close()
    finally:
        d.stop()


def test_small_files_for_workers_through_the_daemon(s3_env: dict, models: dict, shm_guard: str) -> None:
    """Workers read config, tokenizer and the tensor index through loaderd (no S3 client of their own)."""
    uri, local = models["tiny"]
    d = daemon(shm_guard)
    try:
        client = d.client()
        assert client.read_file(uri, "config.json") == (local / "config.json").read_bytes()
        with pytest.raises(NotFoundError, match="does not exist"):
            client.read_file(uri, "no-such-file.json")
        with pytest.raises(InvalidRequestError, match="attach"):
            client.read_file(uri, "model.safetensors")
        with pytest.raises(InvalidRequestError, match="unsafe"):
            client.read_file(uri, "../../etc/passwd")
        files = LoaderModelFiles(uri, d.url, d.token)
        assert files.read_text("tokenizer.json") == (local / "tokenizer.json").read_text()
        with pytest.raises(NotFoundError):
            files.read_text("no-such-file.json")
        assert files.read_optional("no-such-file.json") is None
        assert set(files.tensor_index()) == set(expected(local))
        source = tensor_source(files, files.stage_tensor_names())
        try:
            assert getattr(source, "via", "") == "loaderd"
            assert_same(source, expected(local))
        finally:
            source.close()
    finally:
        d.stop()


def test_worker_learns_when_the_daemon_dies_mid_fetch(s3_server: Any, models: dict, shm_guard: str,
                                                       tmp_path: Path) -> None:
    """A reader waiting for bytes a dead daemon will never write fails in seconds with a clear
    reason (the cold start then 503s and the next one retries), instead of waiting 600 s."""
    import signal

    from hydraserve.processes import free_port

    uri, _ = models["big"]
    token, token_file = new_token_file(tmp_path)
    d = spawn_loaderd(port=free_port(), node_name=shm_guard, budget_bytes=64 << 20, token=token,
                      token_file=token_file, endpoint_url=s3_server.endpoint_url, env=s3_server.client_env(),
                      log_path=tmp_path / "loaderd.log", extra_args=["--concurrency", "1", "--chunk-bytes", "4096"])
    try:
        source = open_through(uri, d.url, d.token)
        names = source.tensor_names()
        source.get(names[0])  # the fetch is under way
        s3_server.kill()  # the rest cannot arrive now ...
        d.proc.send_signal(signal.SIGKILL)  # ... and nobody is left to write it
        d.proc.wait(10)
        start = time.monotonic()
        with pytest.raises(TemporaryError, match="loaderd stopped answering"):
            source.get(names[-1])
        assert time.monotonic() - start < 10
        source._tensors.close()  # type: ignore[attr-defined]
    finally:
        if not s3_server.running:
            s3_server.start()
        d.stop()
        remove_node_segments(shm_guard)  # a SIGKILLed daemon cannot unlink (its next start would)


def test_one_resolution_per_model_version_and_one_head_per_lease_not_a_list_per_call(
        s3_env: dict, models: dict, shm_guard: str) -> None:
    """A cold start calls the daemon for one model seven times (prefetch, four small files, the
    index, attach). The version is resolved once (one LIST); reads reuse it; each lease checks
    it with one HEAD of the push manifest, never a LIST."""
    uri, local = models["tiny"]
    d = daemon(shm_guard, revalidate_s=60)
    s3 = d.service.opener.client(None)
    try:
        def cold_start() -> None:
            lease = d.client().prefetch(PrefetchRequest(model_uri=uri))
            files = LoaderModelFiles(uri, d.url, d.token)  # config, tokenizer files and index, read ahead
            assert files.read_text("config.json") == (local / "config.json").read_text()
            source = tensor_source(files, files.stage_tensor_names())
            assert_same(source, expected(local))
            source.close()
            d.client().release(lease.lease_id)

        s3.reset_stats()
        cold_start()
        first = dict(s3.requests_by_op)
        assert first["LIST"] == 1 and first["HEAD"] == 1  # the resolution; the attach's check
        cold_start()  # the model is held: its version is only checked
        second = {op: n - first.get(op, 0) for op, n in s3.requests_by_op.items()}
        assert second == {"HEAD": 2, "LIST": 0, "GET": 0}  # prefetch and attach; files from memory
    finally:
        d.stop()
