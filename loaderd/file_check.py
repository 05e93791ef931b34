"""Whole-file integrity for files without per-tensor hashes.

Used by hydraserve.loaderd.service once every byte of a file is resident. The push manifest's
sha256 when there is one (format 1); else the S3 ETag when it is an MD5, so models uploaded
with any S3 tool (no manifest, no conversion) are still checked: a single PUT's ETag is the
object's MD5, a multipart upload's is ``md5(md5(part 1) + ... + md5(part N)) + "-N"``. The part
size is not stored, so it is inferred: S3 tools use whole MiB, and the parts must satisfy
(N - 1) x part < size <= N x part; when at most ``MAX_PART_GUESSES`` whole-MiB sizes fit, all
are tried and none matching is a mismatch; when more fit (N small, sizes ambiguous), the file
is reported unverifiable instead of risking a false alarm. Objects encrypted with SSE-KMS or
SSE-C have ETags that are not MD5s: loaderd's ``--no-etag-check`` turns this check off.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from hydraserve.weights.model_version import FileMeta

MiB = 1 << 20
MAX_PART_GUESSES = 4
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
_MULTIPART = re.compile(r"([0-9a-f]{32})-([1-9][0-9]{0,4})")


@dataclass(frozen=True)
class FileCheck:
    """What a whole file is checked against, and how to say so in a log line."""

    what: str  # "the manifest's sha256", "its ETag (MD5)"
    algorithm: str  # "sha256" | "md5" | "md5-multipart"
    expected: str
    part_sizes: tuple[int, ...] = ()

    def matches(self, pieces: list[bytes | memoryview]) -> bool:
        """True if the file, given as consecutive pieces from byte 0, has the expected digest."""
        if self.algorithm != "md5-multipart":
            digest = hashlib.new(self.algorithm)
            for piece in pieces:
                digest.update(piece)
            return digest.hexdigest() == self.expected
        return any(multipart_etag(pieces, size) == self.expected for size in self.part_sizes)


def file_check(meta: FileMeta, *, use_etag: bool = True) -> FileCheck | None:
    """How to check ``meta``'s file as a whole, or None (per-tensor hashes, or nothing usable)."""
    if meta.per_tensor:
        return None  # every tensor is checked on its own as it lands
    if meta.sha256 is not None:
        return FileCheck("the manifest's sha256", "sha256", meta.sha256)
    if not use_etag or not meta.etag:
        return None
    etag = meta.etag.strip('"').lower()
    if _PLAIN_MD5.fullmatch(etag):
        return FileCheck("its ETag (MD5)", "md5", etag)
    m = _MULTIPART.fullmatch(etag)
    if m is None:
        return None
    sizes = part_size_guesses(meta.size, int(m.group(2)))
    if not sizes:
        return None
    return FileCheck("its multipart ETag", "md5-multipart", etag, sizes)


def part_size_guesses(size: int, parts: int) -> tuple[int, ...]:
    """Whole-MiB part sizes that split ``size`` bytes into exactly ``parts`` parts, if few."""
    if parts == 1:
        return (size,) if size > 0 else ()  # one part: the object's size, whatever it is
    low = size // parts + 1 if size % parts else size // parts  # part >= ceil(size / N)
    high = (size - 1) // (parts - 1)  # part < size / (N - 1)
    first, last = -(-low // MiB), high // MiB
    if last < first or last - first + 1 > MAX_PART_GUESSES:
        return ()
    return tuple(k * MiB for k in range(first, last + 1))


def multipart_etag(pieces: list[bytes | memoryview], part_size: int) -> str:
    """The ETag S3 gives a multipart upload of these bytes in parts of ``part_size`` (no copy)."""
    digests: list[bytes] = []
    current, filled = hashlib.md5(), 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while len(view):
            take = min(part_size - filled, len(view))
            current.update(view[:take])
            filled += take
            view = view[take:]
            if filled == part_size:
                digests.append(current.digest())
                current, filled = hashlib.md5(), 0
    if filled:
        digests.append(current.digest())
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"
