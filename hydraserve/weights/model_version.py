"""One version of a stored model, resolved once: its files, tensors, architecture and checks.

``resolve_version(files)`` reads the listing (sizes, ETags), each safetensors header (one
ranged GET per file in S3), the push manifest (sha256 per file; format 2 also per header and
per tensor, the headers checked here) and config.json (the architecture), concurrently: two
round trips before the first tensor can be fetched. Sizes must agree with the manifest and
the headers, or the version is refused before any byte is fetched. Callers: loaderd (which
caches a version and revalidates it cheaply through ``files.fingerprint``), this process's own
S3 fetch (hydraserve.weights.fetched_source) and the placement's model description.
``key`` names the version: it changes whenever a file does, so stale bytes are never reused.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.tensors import TensorEntry
from hydraserve.errors import IntegrityError, InvalidRequestError, MissingObjectError
from hydraserve.weights.architectures import Architecture
from hydraserve.weights.layout import num_layers_in, segment_group, stage_tensors
from hydraserve.weights.manifest import read_manifest

if TYPE_CHECKING:
    from hydraserve.weights.model_files import StoredModelFiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileMeta:
    """One safetensors file: its size, where tensor data starts, and what the manifest says."""

    name: str
    size: int
    data_start: int  # 8 + header length
    sha256: str | None = None
    etag: str | None = None
    header_sha256: str | None = None  # manifest format 2: bytes [0, data_start) of the file
    tensor_sha256: dict[str, str] | None = None  # manifest format 2: tensor name -> sha256

    @property
    def per_tensor(self) -> bool:
        """Every tensor of this file can be verified on its own (the whole-file hash is moot)."""
        return self.tensor_sha256 is not None


@dataclass
class ModelVersion:
    """The tensors of one model version, and how to select and group them."""

    uri: str
    files: dict[str, FileMeta]
    tensors: dict[str, TensorEntry]  # file, then offset order
    architecture: Architecture
    fingerprint: str  # what files.fingerprint() said at resolution (see StoredModelFiles)
    key: str = ""
    tensor_sha256: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.key:
            digest = hashlib.sha256(self.uri.encode())
            for f in sorted(self.files.values(), key=lambda f: f.name):
                digest.update(f"{f.name}:{f.size}:{f.sha256 or ''}:{f.etag or ''}".encode())
            self.key = digest.hexdigest()[:16]
        self.tensor_sha256 = {n: h for f in self.files.values() for n, h in (f.tensor_sha256 or {}).items()}

    @property
    def num_layers(self) -> int:
        return num_layers_in(self.tensors, self.architecture)

    def select(self, stage: StageSpec | None = None, names: Sequence[str] | None = None) -> list[TensorEntry]:
        """The tensors of a stage (the stage slicer), of an explicit list, or (neither) of the
        whole model: everything any stage loads, not the tensors nobody does."""
        if names is not None:
            unknown = [n for n in names if n not in self.tensors]
            if unknown:
                raise InvalidRequestError(f"unknown tensors in {self.uri}: {unknown[:5]}", param="tensors")
            return [self.tensors[n] for n in dict.fromkeys(names)]
        stage = stage or StageSpec.whole(max(1, self.num_layers))
        if stage.num_layers != self.num_layers:
            raise InvalidRequestError(f"stage is of a {stage.num_layers}-layer model; {self.uri} has "
                                      f"{self.num_layers} layers", param="stage")
        return [self.tensors[n] for n in stage_tensors(self.tensors, stage, self.architecture)]

    @property
    def model_bytes(self) -> int:
        """Tensor bytes of the whole model (what a whole-model prefetch holds)."""
        return sum(t.nbytes for t in self.select())

    def groups(self, entries: Sequence[TensorEntry]) -> list[tuple[int, str, list[TensorEntry]]]:
        """Split tensors into segment groups, in streaming order (first layers first)."""
        by_group: dict[str, tuple[int, list[TensorEntry]]] = {}
        for entry in entries:
            order, group = segment_group(self.architecture.role(entry.name))
            by_group.setdefault(group, (order, []))[1].append(entry)
        return sorted(((order, g, members) for g, (order, members) in by_group.items()),
                      key=lambda item: (item[0], item[1]))


def resolve_version(files: StoredModelFiles) -> ModelVersion:
    """Resolve and check the version ``files`` holds now (raises StorageError, IntegrityError,
    InvalidRequestError naming the file)."""
    uri = files.uri
    with ThreadPoolExecutor(max_workers=2) as pool:  # the listing is read once and shared
        manifest_f = pool.submit(read_manifest, files)
        config_f = pool.submit(files.config)
        headers = files.headers()
        listing = files.objects()
        manifest = manifest_f.result()
        architecture = Architecture.from_config(config_f.result())
    metas: dict[str, FileMeta] = {}
    for name, header in headers.items():
        obj = listing.get(name)
        if obj is None:
            raise MissingObjectError(f"{uri}/{name} is listed in the index but not in the store")
        sha = head_sha = None
        tensor_sha: dict[str, str] | None = None
        entry = None
        if manifest is not None:
            try:
                entry = manifest.file(name)
            except KeyError:
                entry = None
        if entry is not None:
            if entry.size != obj.size:
                raise IntegrityError(f"{uri}/{name}: {obj.size} B in the store, manifest says {entry.size} B")
            sha, head_sha, tensor_sha = entry.sha256, entry.header_sha256, entry.tensors
            if tensor_sha is not None and set(tensor_sha) != set(header.entries):
                raise IntegrityError(f"{uri}/{name}: header's tensors differ from the manifest's")
        if header.data_end > obj.size:
            raise IntegrityError(f"{uri}/{name}: header needs {header.data_end} B, object has {obj.size}")
        # Format 2: the header that gave every tensor its dtype, shape and range must be the
        # pushed one (a tensor's hash covers its bytes, not how they are read). The bytes are the
        # ones parsed above: no second GET.
        if head_sha is not None and hashlib.sha256(files.header_bytes(name)).hexdigest() != head_sha:
            raise IntegrityError(f"{uri}/{name}: safetensors header does not match the manifest's sha256")
        metas[name] = FileMeta(name, obj.size, header.data_start, sha, obj.etag.strip('"') or None,
                               head_sha, tensor_sha)
    if manifest is None:
        log.warning("no push manifest: sizes are checked, and whole files against their ETags where those "
                    "are MD5s; no per-tensor sha256", extra={"model": uri})
    tensors = files.tensor_index()
    for name in tensors:
        architecture.role(name)  # a tensor this architecture does not have is refused here, by name
    return ModelVersion(uri=uri, files=metas, tensors=tensors, architecture=architecture,
                        fingerprint=files.fingerprint())
