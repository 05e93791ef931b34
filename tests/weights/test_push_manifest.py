"""Push manifests (compute, verify) and `hydraserve model push` against moto over HTTP."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from hydraserve.contracts.model import MANIFEST_FILE, ManifestFile, ModelManifest
from hydraserve.embedded.s3 import EmbeddedS3
from hydraserve.errors import IntegrityError, InvalidRequestError, NotFoundError
from hydraserve.weights.manifest import (
    compute_manifest,
    parse_manifest,
    read_manifest,
    verify_bytes,
    verify_dir,
)
from hydraserve.weights.model_files import open_model
from hydraserve.weights.push import configure_push, push_model
from hydraserve.weights.s3 import S3Client

from .checkpoints import llama_tensors, write_model


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model", llama_tensors(layers=2), shards=2)


def test_manifest_lists_every_file_with_its_sha256(model_dir: Path) -> None:
    when = datetime(2026, 1, 2, tzinfo=UTC)
    manifest = compute_manifest(model_dir, now=when)
    names = sorted(p.name for p in model_dir.iterdir())
    assert manifest.names() == names and manifest.created_at == when
    for entry in manifest.files:
        data = (model_dir / entry.name).read_bytes()
        assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.total_bytes == sum((model_dir / n).stat().st_size for n in names)
    assert manifest.safetensors_bytes() == sum(
        (model_dir / n).stat().st_size for n in names if n.endswith(".safetensors"))
    assert parse_manifest(manifest.model_dump_json()) == manifest


def test_manifest_has_a_sha256_per_safetensors_header_and_tensor(model_dir: Path) -> None:
    from safetensors.torch import load_file

    manifest = compute_manifest(model_dir)
    assert manifest.format_version == 2
    shards = [e for e in manifest.files if e.name.endswith(".safetensors")]
    assert len(shards) == 2
    for entry in manifest.files:
        if not entry.name.endswith(".safetensors"):
            assert entry.tensors is None and entry.header_sha256 is None
            continue
        raw = (model_dir / entry.name).read_bytes()
        data_start = 8 + int.from_bytes(raw[:8], "little")
        assert entry.header_sha256 == hashlib.sha256(raw[:data_start]).hexdigest()
        tensors = load_file(str(model_dir / entry.name))
        assert entry.tensors is not None and set(entry.tensors) == set(tensors)
        for name, t in tensors.items():  # the bytes safetensors itself hands out for the tensor
            data = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert entry.tensors[name] == hashlib.sha256(data).hexdigest(), name


def test_format_1_manifests_are_still_accepted() -> None:
    doc = b'{"format_version": 1, "files": [{"name": "a.safetensors", "size": 3, "sha256": "' + b"0" * 64 + \
        b'"}], "total_bytes": 3, "created_at": "2026-01-01T00:00:00Z"}'
    manifest = parse_manifest(doc)
    assert manifest.format_version == 1 and manifest.files[0].tensors is None
    with pytest.raises(InvalidRequestError, match="format_version 2"):
        parse_manifest(doc.replace(b'"size": 3,', b'"size": 3, "header_sha256": "' + b"1" * 64
                                   + b'", "tensors": {"x": "' + b"2" * 64 + b'"},'))


def test_verify_accepts_exact_bytes_and_rejects_anything_else(model_dir: Path) -> None:
    manifest = compute_manifest(model_dir)
    data = (model_dir / "config.json").read_bytes()
    verify_bytes(manifest, "config.json", data)
    verify_bytes(manifest, "config.json", memoryview(bytearray(data)))
    verify_dir(manifest, model_dir)
    with pytest.raises(IntegrityError, match="bytes, manifest says"):
        verify_bytes(manifest, "config.json", data + b" ")
    flipped = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(IntegrityError, match="sha256"):
        verify_bytes(manifest, "config.json", flipped)
    with pytest.raises(IntegrityError, match="not listed"):
        verify_bytes(manifest, "other.json", data)
    (model_dir / "config.json").write_bytes(flipped)
    with pytest.raises(IntegrityError):
        verify_dir(manifest, model_dir)


def test_manifest_contract_rejects_inconsistent_documents() -> None:
    good = ManifestFile(name="a.bin", size=3, sha256="0" * 64)
    now = datetime.now(UTC)
    with pytest.raises(ValidationError, match="total_bytes"):
        ModelManifest(files=[good], total_bytes=4, created_at=now)
    with pytest.raises(ValidationError, match="duplicate"):
        ModelManifest(files=[good, good], total_bytes=6, created_at=now)
    for bad in ({"name": "../a", "size": 1, "sha256": "0" * 64},
                {"name": "a", "size": 1, "sha256": "XYZ"},
                {"name": "a", "size": -1, "sha256": "0" * 64}):
        with pytest.raises(ValidationError):
            ManifestFile(**bad)
    with pytest.raises(InvalidRequestError):
        parse_manifest(b'{"format_version": 3, "files": [], "total_bytes": 0, "created_at": 0}')


def test_directories_with_subfolders_or_nothing_are_refused(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        compute_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError):
        compute_manifest(tmp_path / "empty")
    (tmp_path / "nested" / "sub").mkdir(parents=True)
    (tmp_path / "nested" / "config.json").write_text("{}")
    with pytest.raises(InvalidRequestError, match="subdirectories"):
        compute_manifest(tmp_path / "nested")


def _requests_for(server: EmbeddedS3, bucket: str) -> list[str]:
    """Method and path of every request the server logged for ``bucket``, in order."""
    log = re.sub(r"\x1b\[[0-9;]*m", "", server.log_tail(10**9))  # werkzeug colours some lines
    return re.findall(rf'"((?:PUT|POST|DELETE) /{bucket}/[^ ?]*)', log)


def test_push_uploads_everything_and_writes_the_manifest_last(
        s3_server: EmbeddedS3, s3_client: S3Client, bucket: str, model_dir: Path) -> None:
    s3_client.put_bytes(bucket, f"llama/{MANIFEST_FILE}", b"stale")  # from an earlier push
    manifest = push_model(model_dir, f"s3://{bucket}/llama", progress=False, client=s3_client)

    model = open_model(f"s3://{bucket}/llama", client=s3_client)
    assert read_manifest(model) == manifest
    for entry in manifest.files:
        data = model.read_bytes(entry.name)
        verify_bytes(manifest, entry.name, data)
    requests = _requests_for(s3_server, bucket)
    manifest_path = f"/{bucket}/llama/{MANIFEST_FILE}"
    writes = [r for r in requests if r.startswith(("PUT", "POST"))]
    assert writes[-1] == f"PUT {manifest_path}"  # the manifest is the last write
    deleted_at = requests.index(f"DELETE {manifest_path}")
    first_file_put = next(i for i, r in enumerate(requests)
                          if r.startswith("PUT") and MANIFEST_FILE not in r)
    assert deleted_at < first_file_put  # the stale manifest is gone before any new byte


def test_push_uses_multipart_for_big_files(s3_server: EmbeddedS3, bucket: str, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(os.urandom(11 * 1024 * 1024))
    client = s3_server.client(multipart_threshold=5 * 1024 * 1024, multipart_chunk=5 * 1024 * 1024)
    manifest = push_model(tmp_path / "m", f"s3://{bucket}/big", progress=False, client=client)
    info = client.head(bucket, "big/model.safetensors")
    assert info.etag.endswith('-3"') and info.size == manifest.total_bytes
    data = bytes(client.get_range(bucket, "big/model.safetensors", 0, info.size))
    verify_bytes(manifest, "model.safetensors", data)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    configure_push(parser.add_subparsers(dest="model_command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cli_push_creates_the_bucket(s3_server: EmbeddedS3, model_dir: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for var, value in s3_server.client_env().items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # comes from the flag instead
    rc = _cli(["push", str(model_dir), "s3://cli-made-bucket/m", "--create-bucket", "--no-progress",
               "--endpoint-url", s3_server.endpoint_url])
    assert rc == 0
    assert "pushed 5 files" in capsys.readouterr().out
    model = open_model("s3://cli-made-bucket/m", s3_server.endpoint_url)
    assert read_manifest(model) is not None
    assert len(model.tensor_index()) == len(llama_tensors(layers=2))


def test_cli_push_reports_errors_without_a_traceback(
        s3_server: EmbeddedS3, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for var, value in s3_server.client_env().items():
        monkeypatch.setenv(var, value)
    assert _cli(["push", str(model_dir), "s3://never-created-bkt/m", "--no-progress"]) == 1
    assert "bucket 'never-created-bkt' does not exist" in capsys.readouterr().err
    assert _cli(["push", str(model_dir), "s3://bkt/../x", "--no-progress"]) == 1
    assert _cli(["push", str(model_dir.parent / "nope"), "s3://bkt/x", "--no-progress"]) == 1


def test_local_model_without_manifest(model_dir: Path) -> None:
    assert read_manifest(open_model(str(model_dir))) is None
