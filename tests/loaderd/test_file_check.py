"""Models uploaded without our push manifest are checked against their S3 ETags.

The reference is the S3 server itself (moto over HTTP computes ETags as S3 does): a single PUT's
ETag is the object's MD5, a multipart upload's is the MD5 of the parts' MD5s plus "-N". Bytes
corrupted between the store and the segment are caught and never reported complete; with
--no-etag-check (SSE-KMS buckets) nothing is checked and nothing fails.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig

from hydraserve.contracts.loader import PrefetchRequest
from hydraserve.loaderd.file_check import MiB, file_check, multipart_etag, part_size_guesses
from hydraserve.loaderd.models import S3Opener
from hydraserve.loaderd.service import LoaderConfig, LoaderService
from hydraserve.weights.model_files import S3ModelFiles
from hydraserve.weights.model_version import FileMeta
from hydraserve.weights.s3_uri import parse_s3_uri

from .conftest import llama_like, write_model

BUCKET = "etag-tests"


class CorruptingFiles(S3ModelFiles):
    """The real S3 model, flipping one byte of ``file`` at ``at`` as it is read (damage in transit)."""

    def __init__(self, uri: str, opener: S3Opener, endpoint: str | None, file: str, at: int | None) -> None:
        super().__init__(parse_s3_uri(uri), opener.client(endpoint))
        self.file, self.at = file, at

    def read_into(self, file: str, start: int, out: memoryview, cancel: Any = None) -> None:
        super().read_into(file, start, out, cancel)
        if self.at is not None and file == self.file and start <= self.at < start + len(out):
            out[self.at - start] ^= 0xFF


@pytest.fixture(autouse=True)
def s3_credentials(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.client_env().items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def uploaded(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[str, str]]:
    """A two-shard model uploaded with boto3 as a user would (no manifest): the big shard in
    5 MiB multipart parts, the small one with a single PUT. Returns (uri, dir, file -> ETag)."""
    root = write_model(tmp_path_factory.mktemp("etag") / "m", llama_like(layers=2, hidden=384, vocab=6000), shards=2)
    env = s3_server.client_env()
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    prefix = f"m-{uuid.uuid4().hex[:6]}"
    files = sorted(p for p in root.iterdir() if p.is_file())
    big = max((p for p in files if p.suffix == ".safetensors"), key=lambda p: p.stat().st_size)
    assert big.stat().st_size > 10 * MiB
    for path in files:
        threshold = 5 * MiB if path == big else 1 << 30
        s3.upload_file(str(path), BUCKET, f"{prefix}/{path.name}",
                       Config=TransferConfig(multipart_threshold=threshold, multipart_chunksize=5 * MiB))
    etags = {o["Key"].rsplit("/", 1)[-1]: o["ETag"].strip('"')
             for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]}
    assert "-" in etags[big.name] and all("-" not in e for f, e in etags.items() if f != big.name)
    return f"s3://{BUCKET}/{prefix}", root, etags


def test_our_etags_equal_the_servers(uploaded: tuple[str, Path, dict[str, str]]) -> None:
    _, root, etags = uploaded
    for name, etag in etags.items():
        data = (root / name).read_bytes()
        if "-" in etag:
            assert multipart_etag([data[:1000], data[1000:]], 5 * MiB) == etag  # split anywhere
            assert multipart_etag([data], 8 * MiB) != etag
            check = file_check(FileMeta(name, len(data), 0, etag=etag))
            assert check is not None and 5 * MiB in check.part_sizes and check.matches([data])
        else:
            assert hashlib.md5(data).hexdigest() == etag
            check = file_check(FileMeta(name, len(data), 0, etag=etag))
            assert check is not None and check.algorithm == "md5" and check.matches([data])
            assert not check.matches([data[:-1] + bytes([data[-1] ^ 1])])


def test_part_size_guesses_are_few_or_none() -> None:
    assert part_size_guesses(13 * MiB, 3) == (5 * MiB, 6 * MiB)  # 2 x 5 < 13 <= 3 x 5 (and 6)
    assert part_size_guesses(5 * 10**9, 597) == (8 * MiB,)  # aws cli's 8 MiB on a 5 GB file
    assert part_size_guesses(300 * MiB, 2) == ()  # 150..299 MiB all fit: ambiguous, not checked
    assert file_check(FileMeta("f", 300 * MiB, 0, etag="0" * 32 + "-2")) is None
    assert file_check(FileMeta("f", 10, 0, etag="not-an-md5")) is None
    assert file_check(FileMeta("f", 10, 0, sha256="a" * 64, etag="0" * 32)).algorithm == "sha256"  # manifest wins


def _service(node: str, endpoint_url: str, corrupt: tuple[str, int] | None, etag_check: bool = True) -> LoaderService:
    file, at = corrupt if corrupt else ("", None)
    opener = S3Opener(retry_budget_s=5)
    return LoaderService(LoaderConfig(node_name=node, budget_bytes=64 << 20, retry_budget_s=5, etag_check=etag_check,
                                      endpoint_url=endpoint_url),
                         open_model=lambda uri, endpoint: CorruptingFiles(uri, opener, endpoint, file, at))


def _prefetch_and_wait(service: LoaderService, uri: str, endpoint: str) -> dict[str, str]:
    service.prefetch(PrefetchRequest(model_uri=uri, endpoint_url=endpoint))
    segments = list(service.registry.segments.values())
    for seg in segments:
        assert seg.done.wait(30)
    service.tried = segments  # type: ignore[attr-defined]  # a failed one leaves the table (its memory freed)
    return {s.group: s.state for s in segments}


def test_a_model_without_manifest_is_verified_against_its_etags(
        s3_server: Any, shm_guard: str, uploaded: tuple[str, Path, dict[str, str]]) -> None:
    uri, _, etags = uploaded
    service = _service(shm_guard, s3_server.endpoint_url, None)
    try:
        states = _prefetch_and_wait(service, uri, s3_server.endpoint_url)
        assert set(states.values()) == {"complete"}
        key = service.model(uri, s3_server.endpoint_url).version.key
        shards = {f for f in etags if f.endswith(".safetensors")}
        assert {f for k, f in service._verified if k == key} == shards
        assert service.metrics.integrity_failures._value.get() == 0
    finally:
        service.close()


@pytest.mark.parametrize("multipart", [True, False])
def test_bytes_damaged_in_transit_fail_the_etag_check(
        s3_server: Any, shm_guard: str, uploaded: tuple[str, Path, dict[str, str]], multipart: bool) -> None:
    uri, root, etags = uploaded
    victim = next(f for f, e in etags.items() if f.endswith(".safetensors") and ("-" in e) == multipart)
    at = (root / victim).stat().st_size - 7  # inside the file's last tensor
    service = _service(shm_guard, s3_server.endpoint_url, (victim, at))
    try:
        states = _prefetch_and_wait(service, uri, s3_server.endpoint_url)
        assert "failed" in states.values()
        assert service.metrics.integrity_failures._value.get() == 1
        failed = [s for s in service.tried if s.state == "failed"]  # type: ignore[attr-defined]
        assert failed and all(any(r.file == victim for r in s.layout.runs) for s in failed)
        assert not [s for s in failed if s in service.registry.segments.values()], "a failed segment kept its memory"
        assert all(not os.path.exists(s.writer.path or "") for s in failed)
        assert all("does not match its" in (s.error or "") and "--no-etag-check" in (s.error or "") for s in failed)
    finally:
        service.close()


def test_no_etag_check_checks_nothing(s3_server: Any, shm_guard: str,
                                      uploaded: tuple[str, Path, dict[str, str]]) -> None:
    uri, root, etags = uploaded
    victim = next(f for f in etags if f.endswith(".safetensors"))
    service = _service(shm_guard, s3_server.endpoint_url, (victim, (root / victim).stat().st_size - 7), etag_check=False)
    try:
        assert set(_prefetch_and_wait(service, uri, s3_server.endpoint_url).values()) == {"complete"}
        assert not service._verified
    finally:
        service.close()
