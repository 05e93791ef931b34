"""The only module that talks to S3: URI validation, the client, ranged GETs with retries.

Callers: :mod:`hydraserve.weights.model_files` (headers, config files), the S3 tensor source
(concurrent ranged GETs), :mod:`hydraserve.weights.push` (uploads), loaderd (prefetch into
shared memory via :meth:`S3Client.get_range_into`) and the embedded S3 server helper.

Error mapping, in one place (:func:`classify`): a missing object, a missing bucket and
rejected credentials are :class:`~hydraserve.errors.StorageError` (permanent, naming the
``s3://bucket/key``, never the credentials); timeouts, dropped connections, 5xx and
throttling are retried with exponential backoff and full jitter, and once the retry budget is
spent they become :class:`~hydraserve.errors.TemporaryError` naming the endpoint. A ranged GET
whose stream drops mid-body resumes from the first byte not yet received.

This client is the only layer that retries S3 (the fetch engine above it never does), so one
budget bounds every operation: no attempt starts later than ``RetryPolicy.budget_s`` (15 s by
default) after the first, and each attempt is bounded by the connect timeout (3 s) or, for a
stream that stalls, the read timeout (10 s between bytes). A dead S3 (connection refused,
5xx) fails an operation in about 15 s; a black hole in at most 15 + 3 s. Clock, sleep and
randomness are injected, so the budget is tested exactly.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bexc
import botocore.session
import urllib3.exceptions
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from hydraserve.errors import HydraError, MissingObjectError, StorageError, TemporaryError
from hydraserve.weights.retry import RetryPolicy
from hydraserve.weights.s3_uri import (
    ObjectInfo,
    S3Uri,
    is_s3_uri,
    parse_s3_uri,
    validate_bucket,
    validate_file_name,
    validate_key,
)

# URI helpers live in s3_uri (no boto3 needed); re-exported so callers import one module.
__all__ = ["ObjectInfo", "RetryPolicy", "S3Client", "S3Credentials", "S3Uri", "classify",
           "is_s3_uri", "make_boto_client", "parse_s3_uri", "validate_bucket", "validate_file_name",
           "validate_key"]

T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_REGION = "us-east-1"
_READ_PIECE = 256 * 1024  # progress granularity of a ranged GET (what a resume can keep)

# --------------------------------------------------------------------------- credentials, errors


@dataclass(frozen=True)
class S3Credentials:
    """A static access key pair. The secret never appears in repr() or logs."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    def __repr__(self) -> str:
        return f"S3Credentials(access_key_id={self.access_key_id!r}, secret_access_key=***)"


_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CREDENTIALS = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
                "InvalidToken", "ExpiredToken", "InvalidClientTokenId", "Forbidden"}
_RETRYABLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
              "RequestTimeoutException", "InternalError", "ServiceUnavailable", "503", "500",
              "RequestLimitExceeded", "TooManyRequestsException"}
_TRANSIENT = (bexc.ConnectionError, bexc.HTTPClientError, bexc.ResponseStreamingError,
              bexc.IncompleteReadError, urllib3.exceptions.HTTPError, ConnectionError,
              TimeoutError, OSError)


def classify(exc: BaseException, uri: str) -> HydraError | None:
    """The permanent error ``exc`` means for ``uri``, or None if retrying may help."""
    if isinstance(exc, HydraError):
        return None if exc.retryable else exc
    if isinstance(exc, bexc.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            bucket = uri[len("s3://"):].split("/", 1)[0]
            return StorageError(f"S3 bucket {bucket!r} does not exist ({uri})", code="no_such_bucket")
        if code in _NOT_FOUND or status == 404:
            return MissingObjectError(f"S3 object {uri} does not exist")
        if code in _CREDENTIALS or status == 403:
            return StorageError(
                f"S3 rejected the credentials for {uri} ({code or status}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile) and the bucket policy",
                code="credentials_rejected")
        if code in _RETRYABLE or status >= 500 or status == 429:
            return None
        return StorageError(f"S3 error {code or status} for {uri}: {error.get('Message', '')}",
                            code="s3_error")
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return StorageError(f"no S3 credentials found for {uri}: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or a profile", code="no_credentials")
    if isinstance(exc, _TRANSIENT):
        return None
    if isinstance(exc, bexc.BotoCoreError):
        return StorageError(f"S3 request for {uri} failed: {exc}", code="s3_error")
    raise exc


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 300 else text[:297] + "..."


# --------------------------------------------------------------------------- client


_LOADER_LOCK = threading.Lock()
_LOADER: Any = None


def _new_session() -> boto3.session.Session:
    """A fresh session (credentials resolved anew) sharing one botocore model loader.

    Loading the S3 service model costs ~0.2 s per session; the loader caches it. A fresh
    session per client keeps credential resolution per client (no stale cached keys).
    """
    global _LOADER
    core = botocore.session.get_session()
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _LOADER)
    return boto3.session.Session(botocore_session=core)


CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0


def make_boto_client(endpoint_url: str | None = None, *, credentials: S3Credentials | None = None,
                     region: str | None = None, max_pool_connections: int = 64,
                     connect_timeout_s: float = CONNECT_TIMEOUT_S, read_timeout_s: float = READ_TIMEOUT_S,
                     addressing_style: str = "path") -> Any:
    """A boto3 S3 client: endpoint from the argument or AWS_ENDPOINT_URL(_S3), path-style.

    Credentials come from ``credentials`` or boto3's usual chain (environment, files,
    instance metadata). Retries are ours (:class:`S3Client`), so botocore makes one attempt.
    """
    endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                    or os.environ.get("AWS_ENDPOINT_URL") or None)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
        or DEFAULT_REGION
    session = _new_session()
    config = Config(
        region_name=region,
        s3={"addressing_style": addressing_style},
        max_pool_connections=max_pool_connections,
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"max_attempts": 1, "mode": "standard"},
        tcp_keepalive=True,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    kwargs: dict[str, Any] = {}
    if credentials is not None:
        kwargs = {"aws_access_key_id": credentials.access_key_id,
                  "aws_secret_access_key": credentials.secret_access_key}
    return session.client("s3", endpoint_url=endpoint_url, config=config, **kwargs)


class S3Client:
    """Thread-safe S3 operations with our retry policy and error mapping; counts requests/bytes."""

    def __init__(self, endpoint_url: str | None = None, *, credentials: S3Credentials | None = None,
                 region: str | None = None, max_pool_connections: int = 64,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, read_timeout_s: float = READ_TIMEOUT_S,
                 retry: RetryPolicy | None = None, multipart_threshold: int = 64 * MiB,
                 multipart_chunk: int = 16 * MiB,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 rand: Callable[[], float] = random.random,
                 on_retry: Callable[[str], None] | None = None) -> None:
        self._boto = make_boto_client(endpoint_url, credentials=credentials, region=region,
                                      max_pool_connections=max_pool_connections,
                                      connect_timeout_s=connect_timeout_s,
                                      read_timeout_s=read_timeout_s)
        self.endpoint_url: str = self._boto.meta.endpoint_url
        self.retry = retry or RetryPolicy()
        self.max_pool_connections = max_pool_connections
        self._transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                        multipart_chunksize=multipart_chunk, max_concurrency=4)
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._on_retry = on_retry  # called with the error's type name before each retry (metrics)
        self._lock = threading.Lock()
        self.requests = 0
        self.requests_by_op: collections.Counter[str] = collections.Counter()  # "GET", "HEAD", "LIST", ...
        self.retries = 0
        self.bytes_received = 0

    def _count(self, requests: int = 0, nbytes: int = 0, retries: int = 0, op: str = "") -> None:
        with self._lock:
            self.requests += requests
            self.bytes_received += nbytes
            self.retries += retries
            if op:
                self.requests_by_op[op] += requests

    def reset_stats(self) -> None:
        with self._lock:
            self.requests = self.retries = self.bytes_received = 0
            self.requests_by_op.clear()

    # ---------------------------------------------------------------- retry loop

    def _retrying(self, uri: str, what: str, attempt_fn: Callable[[], T],
                  made_progress: Callable[[], bool] = lambda: False,
                  cancel: threading.Event | None = None) -> T:
        """Run ``attempt_fn`` until it succeeds, fails permanently, or the budget is spent.

        ``made_progress`` (checked after a failure) resets the attempt count: a stream that
        keeps delivering bytes between drops is not failing; the time budget still bounds it.
        """
        started = self._clock()
        attempt = 0
        while True:
            try:
                return attempt_fn()
            except Exception as exc:
                permanent = classify(exc, uri)
                if permanent is not None:
                    raise permanent from exc
                attempt = 0 if made_progress() else attempt
                attempt += 1
                delay = self.retry.delay(attempt, self._rand())
                elapsed = self._clock() - started
                if attempt >= self.retry.max_attempts or elapsed + delay > self.retry.budget_s:
                    raise TemporaryError(
                        f"S3 {what} {uri} failed {attempt} times in {elapsed:.1f} s "
                        f"(endpoint {self.endpoint_url}); last error: {_short(exc)}",
                        code="s3_unavailable", retry_after_s=max(1.0, self.retry.max_delay_s),
                    ) from exc
                if cancel is not None and cancel.is_set():
                    raise TemporaryError(f"S3 {what} {uri} cancelled", code="cancelled") from exc
                self._count(retries=1)
                if self._on_retry is not None:
                    self._on_retry(type(exc).__name__)
                if cancel is None:
                    self._sleep(delay)
                elif cancel.wait(delay):
                    raise TemporaryError(f"S3 {what} {uri} cancelled", code="cancelled") from exc

    # ---------------------------------------------------------------- reads

    def head(self, bucket: str, key: str) -> ObjectInfo:
        uri = str(S3Uri(bucket, key))

        def attempt() -> ObjectInfo:
            self._count(requests=1, op="HEAD")
            resp = self._boto.head_object(Bucket=bucket, Key=key)
            return ObjectInfo(key, int(resp["ContentLength"]), str(resp.get("ETag", "")))

        return self._retrying(uri, "HEAD", attempt)

    def get_object_bytes(self, bucket: str, key: str) -> bytes:
        """The whole object (small files: config, tokenizer, index, manifest)."""
        uri = str(S3Uri(bucket, key))

        def attempt() -> bytes:
            self._count(requests=1, op="GET")
            body = self._boto.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            self._count(nbytes=len(data))
            return data

        return self._retrying(uri, "GET", attempt)

    def get_prefix(self, bucket: str, key: str, length: int) -> tuple[bytes, int]:
        """Up to ``length`` first bytes of an object and the object's total size (one GET)."""
        uri = str(S3Uri(bucket, key))

        def attempt() -> tuple[bytes, int]:
            self._count(requests=1, op="GET")
            resp = self._boto.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{length - 1}")
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            self._count(nbytes=len(data))
            content_range = str(resp.get("ContentRange", ""))
            total = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else len(data)
            return data, total

        return self._retrying(uri, "GET", attempt)

    def get_range(self, bucket: str, key: str, start: int, end_exclusive: int, *,
                  cancel: threading.Event | None = None) -> bytearray:
        """Bytes [start, end_exclusive) of an object, retried and resumed (see module doc)."""
        out = bytearray(end_exclusive - start)
        self.get_range_into(bucket, key, start, memoryview(out), cancel=cancel)
        return out

    def get_range_into(self, bucket: str, key: str, start: int, out: memoryview | bytearray,
                       *, cancel: threading.Event | None = None) -> None:
        """Fill ``out`` with bytes [start, start + len(out)) of the object, no extra copy.

        If the stream drops mid-body, the next attempt asks only for the bytes still missing.
        Raises StorageError if the object is shorter than the range; setting ``cancel`` stops
        retrying (TemporaryError) instead of waiting out the budget.
        """
        view = memoryview(out).cast("B")
        length = len(view)
        if length == 0:
            return
        uri = str(S3Uri(bucket, key))
        received = 0
        at_last_failure = 0

        def attempt() -> None:
            nonlocal received
            begin = start + received
            self._count(requests=1, op="GET")
            resp = self._boto.get_object(Bucket=bucket, Key=key,
                                         Range=f"bytes={begin}-{start + length - 1}")
            body = resp["Body"]
            try:
                expected = length - received
                if int(resp.get("ContentLength", expected)) != expected:
                    raise StorageError(
                        f"S3 object {uri} is shorter than the requested range "
                        f"[{start}, {start + length}): got {resp.get('ContentRange')}",
                        code="short_object")
                while received < length:
                    n = body.readinto(view[received:min(length, received + _READ_PIECE)])
                    if not n:
                        raise bexc.IncompleteReadError(actual_bytes=received, expected_bytes=length)
                    received += n
                    self._count(nbytes=n)
            finally:
                body.close()

        def progressed() -> bool:
            nonlocal at_last_failure
            moved = received > at_last_failure
            at_last_failure = received
            return moved

        self._retrying(uri, f"GET bytes={start}-{start + length - 1}", attempt, progressed, cancel)

    def list_buckets(self) -> list[str]:
        def attempt() -> list[str]:
            self._count(requests=1, op="LIST")
            return [b["Name"] for b in self._boto.list_buckets().get("Buckets", [])]

        return self._retrying("s3://", "LIST BUCKETS", attempt)

    def list_prefix(self, bucket: str, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix`` (a directory-like prefix; '/' is added if missing)."""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        uri = str(S3Uri(bucket, prefix.rstrip("/")))

        def attempt() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            for page in self._boto.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix):
                self._count(requests=1, op="LIST")
                found.extend(ObjectInfo(o["Key"], int(o["Size"]), str(o.get("ETag", "")))
                             for o in page.get("Contents", []))
            return found

        return self._retrying(uri, "LIST", attempt)

    # ---------------------------------------------------------------- writes

    def create_bucket(self, bucket: str, *, exist_ok: bool = True) -> None:
        validate_bucket(bucket)

        def attempt() -> None:
            self._count(requests=1, op="PUT")
            try:
                self._boto.create_bucket(Bucket=bucket)
            except bexc.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if not (exist_ok and code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")):
                    raise

        self._retrying(f"s3://{bucket}", "CREATE BUCKET", attempt)

    def put_bytes(self, bucket: str, key: str, data: bytes,
                  content_type: str = "application/octet-stream") -> None:
        uri = str(S3Uri(bucket, key))

        def attempt() -> None:
            self._count(requests=1, op="PUT")
            self._boto.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

        self._retrying(uri, "PUT", attempt)

    def put_file(self, bucket: str, key: str, path: Path,
                 callback: Callable[[int], None] | None = None) -> None:
        """Upload a file; multipart (parallel parts) above the multipart threshold."""
        uri = str(S3Uri(bucket, key))

        if path.stat().st_size < self._transfer.multipart_threshold:
            def put_small() -> None:  # one PUT: the transfer manager costs ~0.4 s per file
                self._count(requests=1, op="PUT")
                with open(path, "rb") as f:
                    self._boto.put_object(Bucket=bucket, Key=key, Body=f)
                if callback is not None:
                    callback(path.stat().st_size)

            return self._retrying(uri, "PUT", put_small)

        def attempt() -> None:
            self._count(requests=1, op="PUT")
            try:
                self._boto.upload_file(str(path), bucket, key, Config=self._transfer,
                                       Callback=callback)
            except boto3.exceptions.S3UploadFailedError as exc:
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, Exception):
                    raise cause from exc
                raise StorageError(f"upload to {uri} failed: {exc}") from exc

        self._retrying(uri, "PUT", attempt)

    def delete(self, bucket: str, key: str) -> None:
        """Delete an object (no error if it does not exist)."""
        uri = str(S3Uri(bucket, key))

        def attempt() -> None:
            self._count(requests=1, op="DELETE")
            self._boto.delete_object(Bucket=bucket, Key=key)

        self._retrying(uri, "DELETE", attempt)

    def put(self, bucket: str, key: str, data: bytes | Path,
            callback: Callable[[int], None] | None = None) -> None:
        """Bytes in one PUT, or a file (multipart above the threshold)."""
        if isinstance(data, Path):
            self.put_file(bucket, key, data, callback)
        else:
            self.put_bytes(bucket, key, data)
            if callback is not None:
                callback(len(data))
