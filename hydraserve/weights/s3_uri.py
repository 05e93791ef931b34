"""S3 URIs and object-key safety: ``s3://bucket/prefix`` parsing and file-name validation.

Pure string checks and records, no boto3 (so argument parsing, contracts and the worker's
loaderd path can use them without importing it);
re-exported by :mod:`hydraserve.weights.s3`. Rejects path traversal (``..``), empty or ``.``
segments (absolute paths), control characters, backslashes and invalid bucket names; model
file names (which come from untrusted index files) must be one flat, safe segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hydraserve.errors import InvalidRequestError

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")


def validate_bucket(name: str) -> str:
    """S3 bucket naming rules (3-63 chars, lowercase, digits, dots, hyphens; not an IP)."""
    if not _BUCKET_RE.fullmatch(name) or ".." in name or _IP_RE.fullmatch(name) or ".-" in name \
            or "-." in name:
        raise InvalidRequestError(f"invalid S3 bucket name {name!r}", param="uri")
    return name


def validate_key(key: str, *, allow_empty: bool = True) -> str:
    """A key or prefix made of safe segments: no '', '.', '..', backslash or control chars."""
    if key == "":
        if allow_empty:
            return key
        raise InvalidRequestError("empty S3 key", param="uri")
    if len(key.encode()) > 1024:
        raise InvalidRequestError("S3 key longer than 1024 bytes", param="uri")
    if _CONTROL_RE.search(key):
        raise InvalidRequestError(f"control character in S3 key {key!r}", param="uri")
    if "\\" in key:
        raise InvalidRequestError(f"backslash in S3 key {key!r}", param="uri")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidRequestError(
                f"S3 key {key!r} has an empty, '.' or '..' path segment (absolute paths and "
                "path traversal are rejected)", param="uri")
    return key


def validate_file_name(name: str) -> str:
    """A model file name (one flat segment such as ``model-00001-of-00002.safetensors``).

    Names come from untrusted files (``model.safetensors.index.json``), so anything that could
    leave the model's directory or prefix is refused.
    """
    if not _FILE_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidRequestError(f"unsafe model file name {name!r}", param="model")
    return name


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing (or a HEAD): its key, size and ETag."""

    key: str
    size: int
    etag: str = ""


@dataclass(frozen=True)
class S3Uri:
    """``s3://bucket/key``; key is a prefix (no trailing slash) or an object key."""

    bucket: str
    key: str = ""

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def child(self, name: str) -> S3Uri:
        """The object ``name`` (one safe file name) under this prefix."""
        validate_file_name(name)
        return S3Uri(self.bucket, f"{self.key}/{name}" if self.key else name)


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3_uri(uri: str) -> S3Uri:
    """Parse and validate ``s3://bucket[/prefix[/]]``; raises InvalidRequestError."""
    if not is_s3_uri(uri):
        raise InvalidRequestError(f"not an s3:// URI: {uri!r}", param="uri")
    rest = uri[len("s3://"):]
    if _CONTROL_RE.search(rest):
        raise InvalidRequestError(f"control character in S3 URI {uri!r}", param="uri")
    bucket, _, key = rest.partition("/")
    validate_bucket(bucket)
    if key.endswith("/"):
        key = key[:-1]
        if key == "" and rest.endswith("//"):
            raise InvalidRequestError(f"empty path segment in {uri!r}", param="uri")
    validate_key(key)
    return S3Uri(bucket, key)


