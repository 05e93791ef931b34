"""The S3 client against a real moto server over HTTP: URIs, errors, credentials, retries."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import botocore.exceptions as bexc
import pytest

from hydraserve.embedded.s3 import EmbeddedS3
from hydraserve.errors import InvalidRequestError, MissingObjectError, StorageError, TemporaryError
from hydraserve.testing.faults import CuttingProxy
from hydraserve.weights.s3 import (
    RetryPolicy,
    S3Client,
    S3Credentials,
    S3Uri,
    classify,
    parse_s3_uri,
)
from tests.conditions import wait_for

# ------------------------------------------------------------------ URIs

@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://models/llama", S3Uri("models", "llama")),
    ("s3://models/llama/", S3Uri("models", "llama")),
    ("s3://models/org/llama-2-7b", S3Uri("models", "org/llama-2-7b")),
    ("s3://my.bucket-1", S3Uri("my.bucket-1", "")),
    ("s3://models/", S3Uri("models", "")),
])
def test_parse_valid_uris(uri: str, expected: S3Uri) -> None:
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", [
    "s3://models/../secrets", "s3://models/a/../../b", "s3://models/./a", "s3://models//etc",
    "s3://models/a//b", "s3://models/a\x00b", "s3://models/a\nb", "s3://models/a\\..\\b",
    "s3://Models/a", "s3://ab/a", "s3://-models/a", "s3://models-/a", "s3://my..bucket/a",
    "s3://192.168.1.1/a", "s3:///a", "http://models/a", "models/a", "s3://models/a" + "x" * 1100,
])
def test_reject_bad_uris(uri: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_s3_uri(uri)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x.safetensors", "", ".hidden", "a\\b", "x\x7f"])
def test_child_rejects_unsafe_file_names(name: str) -> None:
    with pytest.raises(InvalidRequestError):
        S3Uri("models", "m").child(name)


def test_credentials_repr_hides_the_secret() -> None:
    creds = S3Credentials("AKIAEXAMPLE", "very-secret-value")
    assert "very-secret-value" not in repr(creds) and "very-secret-value" not in str(creds)


# ------------------------------------------------------------------ basic operations

def test_put_head_list_get_ranges(s3_client: S3Client, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    s3_client.put_bytes(bucket, "m/a.bin", data)
    (tmp_path / "b.bin").write_bytes(b"xyz")
    seen: list[int] = []
    s3_client.put(bucket, "m/b.bin", tmp_path / "b.bin", callback=seen.append)
    assert seen == [3]

    assert s3_client.head(bucket, "m/a.bin").size == len(data)
    assert [o.key for o in s3_client.list_prefix(bucket, "m")] == ["m/a.bin", "m/b.bin"]
    assert s3_client.get_object_bytes(bucket, "m/b.bin") == b"xyz"
    assert bytes(s3_client.get_range(bucket, "m/a.bin", 1000, 250_000)) == data[1000:250_000]
    prefix, size = s3_client.get_prefix(bucket, "m/a.bin", 64)
    assert (prefix, size) == (data[:64], len(data))
    assert s3_client.get_prefix(bucket, "m/b.bin", 65536) == (b"xyz", 3)
    out = bytearray(10)
    s3_client.get_range_into(bucket, "m/a.bin", 5, memoryview(out))
    assert bytes(out) == data[5:15]


def test_multipart_upload_for_big_files(s3_server: EmbeddedS3, bucket: str, tmp_path: Path) -> None:
    client = s3_server.client(multipart_threshold=5 * 1024 * 1024, multipart_chunk=5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big").write_bytes(data)
    client.put_file(bucket, "big", tmp_path / "big")
    info = client.head(bucket, "big")
    assert info.size == len(data) and info.etag.endswith('-3"')  # three parts
    assert bytes(client.get_range(bucket, "big", 0, len(data))) == data


# ------------------------------------------------------------------ error mapping

def test_missing_object_names_it(s3_client: S3Client, bucket: str) -> None:
    with pytest.raises(MissingObjectError, match=f"s3://{bucket}/no/such.bin does not exist"):
        s3_client.get_range(bucket, "no/such.bin", 0, 10)
    with pytest.raises(MissingObjectError, match=f"s3://{bucket}/no/such.bin"):
        s3_client.head(bucket, "no/such.bin")


def test_missing_bucket(s3_client: S3Client) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist") as info:
        s3_client.get_object_bytes("no-such-bucket-x", "k")
    assert info.value.code == "no_such_bucket" and not info.value.retryable


def test_range_past_the_end_is_a_clear_error(s3_client: S3Client, bucket: str) -> None:
    s3_client.put_bytes(bucket, "small", b"0123456789")
    with pytest.raises(StorageError, match="shorter than the requested range"):
        s3_client.get_range(bucket, "small", 0, 20)


def test_no_credentials_at_all(s3_server: EmbeddedS3, monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    with pytest.raises(StorageError, match="no S3 credentials"):
        S3Client().get_object_bytes("models", "x")


def test_credentials_from_the_environment(s3_server: EmbeddedS3, bucket: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in s3_server.client_env().items():
        monkeypatch.setenv(var, value)
    client = S3Client()  # endpoint and keys from the environment only
    client.put_bytes(bucket, "env", b"ok")
    assert client.endpoint_url == s3_server.endpoint_url
    assert client.get_object_bytes(bucket, "env") == b"ok"


@pytest.fixture(scope="module")
def auth_server():
    with EmbeddedS3(require_auth=True) as server:
        server.create_bucket("secured")
        server.client().put_bytes("secured", "obj", b"payload")
        yield server


def test_rejected_credentials_are_reported_without_the_secret(auth_server: EmbeddedS3) -> None:
    assert auth_server.client().get_object_bytes("secured", "obj") == b"payload"
    good = auth_server.credentials
    for creds in (S3Credentials(good.access_key_id, "wrong-secret-123"),
                  S3Credentials("AKIAUNKNOWNKEY000000", "wrong-secret-123")):
        client = S3Client(auth_server.endpoint_url, credentials=creds)
        with pytest.raises(StorageError, match="rejected the credentials for s3://secured/obj") as info:
            client.get_range("secured", "obj", 0, 3)
        assert info.value.code == "credentials_rejected" and not info.value.retryable
        assert "wrong-secret-123" not in str(info.value)
        assert client.requests == 1  # permanent: not retried


def test_classify_retries_throttling_and_5xx_only() -> None:
    def err(code: str, status: int) -> bexc.ClientError:
        return bexc.ClientError({"Error": {"Code": code, "Message": "m"},
                                 "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    assert classify(err("SlowDown", 503), "s3://b/k") is None
    assert classify(err("InternalError", 500), "s3://b/k") is None
    assert classify(err("Whatever", 502), "s3://b/k") is None
    assert classify(bexc.EndpointConnectionError(endpoint_url="http://x"), "s3://b/k") is None
    assert classify(bexc.ReadTimeoutError(endpoint_url="http://x"), "s3://b/k") is None
    assert isinstance(classify(err("AccessDenied", 403), "s3://b/k"), StorageError)
    assert isinstance(classify(err("InvalidRange", 416), "s3://b/k"), StorageError)


class FakeClock:
    """Time that passes only when the client sleeps: the retry budget is checked exactly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("budget", [15.0, 3.0])
def test_one_retry_budget_bounds_an_operation_against_a_dead_endpoint(budget: float) -> None:
    """Connection refused on every attempt: the client retries with capped, jittered backoff until
    the next pause would end past the budget, then gives up naming the endpoint."""
    from hydraserve.processes import free_port

    clock = FakeClock()
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(max_attempts=1000, budget_s=budget)
    client = S3Client(endpoint, credentials=S3Credentials("k", "s"), retry=policy, clock=clock,
                      sleep=clock.sleep, rand=lambda: 0.999)
    with pytest.raises(TemporaryError, match="failed") as info:
        client.get_object_bytes("bucket", "model/config.json")
    assert endpoint in info.value.message and "s3://bucket/model/config.json" in info.value.message
    attempts = len(clock.sleeps) + 1
    assert f"failed {attempts} times" in info.value.message and client.requests == attempts
    assert clock.now <= budget  # no attempt started after the budget
    assert clock.now + policy.delay(attempts, 0.999) > budget  # and it stopped because of the budget
    assert max(clock.sleeps) <= policy.max_delay_s and clock.sleeps == sorted(clock.sleeps)


def test_the_default_budget_is_fifteen_seconds() -> None:
    assert RetryPolicy().budget_s == 15.0


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=1.0)
    assert [policy.delay(a, 0.999) for a in (1, 2, 3, 4, 5, 9)] == pytest.approx(
        [0.0999, 0.1998, 0.3996, 0.7992, 0.999, 0.999])
    assert policy.delay(3, 0.0) == 0.0


# ------------------------------------------------------------------ dropped streams, dead server

def test_dropped_stream_resumes_where_it_stopped(s3_server: EmbeddedS3, bucket: str) -> None:
    data = os.urandom(3 * 1024 * 1024)
    s3_server.client().put_bytes(bucket, "obj", data)
    proxy = CuttingProxy(s3_server.port, cut_after=700_000, cuts=3)
    try:
        client = S3Client(proxy.endpoint_url, credentials=s3_server.credentials,
                          retry=RetryPolicy(max_attempts=3, base_delay_s=0.01, budget_s=10))
        got = client.get_range(bucket, "obj", 100, len(data))
    finally:
        proxy.close()
    assert bytes(got) == data[100:]
    assert client.retries == 3 and client.requests == 4
    assert client.bytes_received == len(data) - 100  # no byte fetched twice: resumed, not restarted


@pytest.fixture
def private_server():
    with EmbeddedS3() as server:
        yield server


def test_server_killed_and_restarted_mid_get(private_server: EmbeddedS3, tmp_path: Path) -> None:
    data = os.urandom(4 * 1024 * 1024)
    (tmp_path / "obj").write_bytes(data)
    private_server.upload_file(tmp_path / "obj", "durable", "obj")  # remembered across restarts
    client = private_server.client(retry=RetryPolicy(max_attempts=30, base_delay_s=0.05,
                                                     max_delay_s=0.3, budget_s=30))
    private_server.kill()

    def restart() -> None:
        assert wait_for(lambda: client.retries >= 1)  # the GET met the dead server first
        private_server.start()

    restarter = threading.Thread(target=restart)
    restarter.start()
    got = client.get_range("durable", "obj", 0, len(data))
    restarter.join()
    assert bytes(got) == data and client.retries >= 1


def test_server_that_stays_down_gives_temporary_error(private_server: EmbeddedS3) -> None:
    private_server.create_bucket("bkt")
    client = private_server.client(retry=RetryPolicy(max_attempts=50, base_delay_s=0.05,
                                                     max_delay_s=0.2, budget_s=1.0))
    private_server.kill()
    with pytest.raises(TemporaryError, match=r"failed \d+ times") as info:
        client.get_range("bkt", "k", 0, 10)
    assert info.value.retryable and info.value.retry_after_s
    assert private_server.endpoint_url in str(info.value)  # the budget itself: the FakeClock test above


def test_snapshot_brings_back_objects_from_any_client(private_server: EmbeddedS3) -> None:
    private_server.create_bucket("snap")
    client = private_server.client()
    client.put_bytes("snap", "a/one", b"1")
    client.put_bytes("snap", "a/two", b"22")
    client.create_bucket("snap-empty")
    assert private_server.snapshot() == 2
    client.put_bytes("snap", "after", b"lost")  # written after the snapshot
    private_server.restart()
    assert sorted(o.key for o in client.list_prefix("snap", "")) == ["a/one", "a/two"]
    assert client.get_object_bytes("snap", "a/two") == b"22"
    assert "snap-empty" in client.list_buckets()
