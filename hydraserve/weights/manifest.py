"""Compute a push manifest from a directory and verify bytes against one.

Callers: hydraserve.weights.push (computes, then writes it last), loaderd and the runtime
(verify fetched files before handing them out: IntegrityError otherwise), ``read_manifest``
for anything that has a :class:`~hydraserve.weights.model_files.ModelFiles`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from hydraserve.contracts.model import MANIFEST_FILE, SAFE_NAME_RE, ManifestFile, ModelManifest
from hydraserve.errors import IntegrityError, InvalidRequestError, MissingObjectError, NotFoundError

if TYPE_CHECKING:
    from hydraserve.weights.model_files import StoredModelFiles

_PIECE = 4 * 1024 * 1024


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(_PIECE):
            digest.update(piece)
            if on_bytes is not None:
                on_bytes(len(piece))
    return digest.hexdigest()


def hash_safetensors(path: Path, on_bytes: Callable[[int], None] | None = None
                     ) -> tuple[str, str, dict[str, str]]:
    """sha256 of the whole file, of its header (bytes [0, data_start)) and of each tensor's bytes,
    in one read of the file (the file digest is fed the same memory the tensor digests are)."""
    from hydraserve.weights.safetensors_format import PREFIX_BYTES, header_length, parse_header

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(PREFIX_BYTES)
        n = header_length(prefix, str(path))
        head = prefix + f.read(n)
        header = parse_header(head, file_size=size, source=str(path))
        data_start = header.data_start
        whole = hashlib.sha256(head)
        if on_bytes is not None:
            on_bytes(len(head))
        tensors: dict[str, str] = {}
        pos = data_start
        for entry in sorted(header.entries.values(), key=lambda e: e.start):
            if entry.start > pos:  # padding between tensors (not written by safetensors itself)
                gap = f.read(entry.start - pos)
                whole.update(gap)
                pos += len(gap)
            digest = hashlib.sha256()
            left = entry.end - entry.start
            while left:
                piece = f.read(min(left, _PIECE))
                if not piece:
                    raise IntegrityError(f"{path}: ends inside tensor {entry.name}")
                digest.update(piece)
                whole.update(piece)
                left -= len(piece)
                if on_bytes is not None:
                    on_bytes(len(piece))
            pos = entry.end
            tensors[entry.name] = digest.hexdigest()
        while piece := f.read(_PIECE):  # trailing bytes, if any
            whole.update(piece)
            if on_bytes is not None:
                on_bytes(len(piece))
    return whole.hexdigest(), hashlib.sha256(head).hexdigest(), tensors


def _is_safetensors(path: Path) -> bool:
    from hydraserve.weights.safetensors_format import (
        PREFIX_BYTES,
        SafetensorsFormatError,
        header_length,
        parse_header,
    )

    try:
        with open(path, "rb") as f:
            prefix = f.read(PREFIX_BYTES)
            head = prefix + f.read(header_length(prefix, str(path)))
        parse_header(head, file_size=path.stat().st_size, source=str(path))
    except SafetensorsFormatError:
        return False  # not a safetensors file after all: hashed whole only (format 1 entry)
    return True


def _entry(path: Path, on_bytes: Callable[[int], None] | None) -> ManifestFile:
    size = path.stat().st_size
    if path.name.endswith(".safetensors") and _is_safetensors(path):
        whole, head, tensors = hash_safetensors(path, on_bytes)
        return ManifestFile(name=path.name, size=size, sha256=whole, header_sha256=head, tensors=tensors)
    return ManifestFile(name=path.name, size=size, sha256=sha256_file(path, on_bytes))


def model_dir_files(local_dir: Path) -> list[Path]:
    """The files a push uploads: regular files directly in the directory, minus the manifest.

    Subdirectories are not part of the HF layout we serve and are refused, as are file names
    that could not be object keys safely.
    """
    if not local_dir.is_dir():
        raise NotFoundError(f"model directory {local_dir} does not exist")
    files = []
    for path in sorted(local_dir.iterdir()):
        if path.name == MANIFEST_FILE or path.name.startswith("."):
            continue
        if not path.is_file():
            raise InvalidRequestError(f"{path} is not a regular file (subdirectories are not pushed)")
        if not SAFE_NAME_RE.fullmatch(path.name):
            raise InvalidRequestError(f"unsafe file name {path.name!r} in {local_dir}")
        files.append(path)
    if not files:
        raise NotFoundError(f"no files in {local_dir}")
    return files


def compute_manifest(local_dir: str | Path, *, now: datetime | None = None,
                     on_bytes: Callable[[int], None] | None = None) -> ModelManifest:
    """Sizes and sha256 of every file of the directory, plus (format 2) the sha256 of each
    safetensors header and tensor (``on_bytes`` reports hashing progress)."""
    entries = [_entry(p, on_bytes) for p in model_dir_files(Path(local_dir))]
    return ModelManifest(files=entries, total_bytes=sum(e.size for e in entries),
                         created_at=now or datetime.now(UTC))


def verify_bytes(manifest: ModelManifest, name: str, data: bytes | bytearray | memoryview) -> None:
    """Raise IntegrityError unless ``data`` is exactly the file ``name`` of the manifest."""
    try:
        expected = manifest.file(name)
    except KeyError:
        raise IntegrityError(f"{name} is not listed in the model's manifest") from None
    if len(data) != expected.size:
        raise IntegrityError(f"{name}: {len(data)} bytes, manifest says {expected.size}")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.sha256:
        raise IntegrityError(f"{name}: sha256 {actual[:12]}... does not match the manifest "
                             f"({expected.sha256[:12]}...)")


def verify_file(manifest: ModelManifest, name: str, path: Path) -> None:
    """Like verify_bytes, for a file on disk (streamed, not read into memory)."""
    expected = manifest.file(name)
    size = path.stat().st_size
    if size != expected.size:
        raise IntegrityError(f"{path}: {size} bytes, manifest says {expected.size}")
    if sha256_file(path) != expected.sha256:
        raise IntegrityError(f"{path}: sha256 does not match the manifest")


def verify_dir(manifest: ModelManifest, local_dir: str | Path) -> None:
    """Every file the manifest lists is present in the directory with the right bytes."""
    for entry in manifest.files:
        path = Path(local_dir) / entry.name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (listed in the manifest)")
        verify_file(manifest, entry.name, path)


def parse_manifest(data: bytes | str) -> ModelManifest:
    try:
        return ModelManifest.model_validate_json(data)
    except ValueError as exc:
        raise InvalidRequestError(f"invalid {MANIFEST_FILE}: {exc}") from exc


def read_manifest(model: StoredModelFiles) -> ModelManifest | None:
    """The model's manifest, or None if it has none (not pushed by us, or upload unfinished)."""
    try:
        if MANIFEST_FILE not in model.list_files():
            return None
        return parse_manifest(model.read_bytes(MANIFEST_FILE))
    except MissingObjectError:
        return None
