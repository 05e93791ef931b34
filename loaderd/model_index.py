"""What loaderd knows about one model version: its files, tensors (with byte ranges) and groups.

Used by hydraserve.loaderd.service and by the runtime's S3 fallback. Built from the weights
package (the only code that parses safetensors headers and maps names to layers); this module
only adapts it into what the fetch engine needs: tensor specs, one segment group per layer unit
(embeddings, each decoder layer, final norm + head) in streaming order, and a model key that
changes whenever the files change (so stale bytes are never reused).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydraserve.contracts.stage import StageSpec
from hydraserve.errors import InvalidRequestError
from hydraserve.loaderd.segment import TensorSpec


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
class ModelIndex:
    """Tensors of one model version and how to group and select them."""

    uri: str
    endpoint_url: str | None
    files: dict[str, FileMeta]
    tensors: list[TensorSpec]  # file order
    group_of: Callable[[str], tuple[int, str]]  # tensor name -> (streaming order, group name)
    names_for_stage: Callable[[list[str], StageSpec], list[str]]
    read_header: Callable[[str], bytes] | None = None  # file -> its first data_start bytes
    handle: Any = None  # what the range reader needs (for S3: the client and the prefix)
    is_current: Callable[[], bool] | None = None  # False once the files changed (re-resolve)
    read_file: Callable[[str], bytes] | None = None  # a small whole file (config.json, tokenizer)
    key: str = ""
    _by_name: dict[str, TensorSpec] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}
        if not self.key:
            digest = hashlib.sha256(self.uri.encode())
            for f in sorted(self.files.values(), key=lambda f: f.name):
                digest.update(f"{f.name}:{f.size}:{f.sha256 or ''}:{f.etag or ''}".encode())
            self.key = digest.hexdigest()[:16]

    def header_bytes(self, file: str) -> bytes:
        """The file's 8-byte length and JSON header, exactly as stored (for sha256 checks)."""
        if self.read_header is None:
            raise InvalidRequestError(f"no header reader for {self.uri}")
        return self.read_header(file)

    @property
    def model_bytes(self) -> int:
        return sum(t.end - t.start for t in self.tensors)

    def select(self, stage: StageSpec | None, names: Sequence[str] | None) -> list[TensorSpec]:
        """The tensors of a stage, of an explicit list, or (neither) all of them."""
        if stage is not None:
            chosen = self.names_for_stage([t.name for t in self.tensors], stage)
        elif names is not None:
            unknown = [n for n in names if n not in self._by_name]
            if unknown:
                raise InvalidRequestError(f"unknown tensors in {self.uri}: {unknown[:5]}",
                                          param="tensors")
            chosen = list(dict.fromkeys(names))
        else:
            return list(self.tensors)
        return [self._by_name[n] for n in chosen]

    def groups(self, specs: Sequence[TensorSpec]) -> list[tuple[int, str, list[TensorSpec]]]:
        """Split tensors into segment groups, in streaming order (first layers first)."""
        by_group: dict[str, tuple[int, list[TensorSpec]]] = {}
        for spec in specs:
            order, group = self.group_of(spec.name)
            by_group.setdefault(group, (order, []))[1].append(spec)
        return sorted(((order, g, members) for g, (order, members) in by_group.items()),
                      key=lambda item: (item[0], item[1]))
