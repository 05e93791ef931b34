"""One model directory, local or ``s3://bucket/prefix``: its files, tensor index and tensors.

``open_model(uri)`` is how every component reads a model as users already have it (HF layout:
config.json, tokenizer files, *.safetensors, optional model.safetensors.index.json). Callers:
the runtime (config, tokenizer, tensors), loaderd (tensor index -> byte ranges), the placement
service (bytes per layer), ``hydraserve generate``. For S3 each safetensors header is read
with one ranged GET of the file's first 64 KiB (a second only for a longer header); tensors
come through :class:`~hydraserve.weights.s3_source.S3TensorSource`.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hydraserve.errors import InvalidRequestError, NotFoundError, StorageError
from hydraserve.weights.local import LocalTensorSource
from hydraserve.weights.ranges import MiB
from hydraserve.weights.s3 import (
    ObjectInfo,
    S3Client,
    S3Uri,
    is_s3_uri,
    parse_s3_uri,
    validate_file_name,
)
from hydraserve.weights.safetensors_format import (
    PREFIX_BYTES,
    SafetensorsHeader,
    TensorLocation,
    header_length,
    parse_header,
)
from hydraserve.weights.source import TensorSource

INDEX_FILE = "model.safetensors.index.json"
HEADER_PROBE_BYTES = 64 * 1024


class ModelFiles(ABC):
    """Files of one model; tensor index computed once and cached."""

    uri: str

    def __init__(self) -> None:
        self._index: dict[str, TensorLocation] | None = None
        self._headers: dict[str, SafetensorsHeader] = {}
        self._raw_headers: dict[str, bytes] = {}  # exactly bytes [0, data_start) of each file
        self._shards: list[str] | None = None
        self._shards_lock = threading.Lock()

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """A whole file (config, tokenizer, index). Raises NotFoundError/StorageError."""

    @abstractmethod
    def list_files(self) -> list[str]:
        """File names directly in the model directory / prefix, sorted."""

    @abstractmethod
    def _read_header_bytes(self, file: str) -> tuple[bytes, int]:
        """At least the first 8 + N bytes of a safetensors file, and the file's size."""

    def _read_index(self) -> bytes | None:
        """model.safetensors.index.json, or None when the model has no index."""
        return self.read_bytes(INDEX_FILE) if self.exists(INDEX_FILE) else None

    def _read_header(self, file: str) -> SafetensorsHeader:
        data, size = self._read_header_bytes(file)
        header = parse_header(data, file_size=size, source=f"{self.uri}/{file}")
        self._raw_headers[file] = bytes(data[:header.data_start])
        return header

    def header_bytes(self, file: str) -> bytes:
        """The file's 8-byte length and JSON header exactly as stored (for sha256 checks);
        kept from the read that parsed it, so checking costs no second GET."""
        self.headers()
        return self._raw_headers[file]

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{self.uri}/{name} is not valid JSON: {exc}") from exc

    def exists(self, name: str) -> bool:
        return validate_file_name(name) in self.list_files()

    def safetensors_files(self) -> list[str]:
        """Shard names from the index's weight_map, else every *.safetensors file (read once)."""
        with self._shards_lock:
            if self._shards is None:
                self._shards = self._find_shards()
            return list(self._shards)

    def _find_shards(self) -> list[str]:
        raw_index = self._read_index()
        if raw_index is not None:
            try:
                weight_map = json.loads(raw_index).get("weight_map")
            except (json.JSONDecodeError, AttributeError) as exc:
                raise InvalidRequestError(f"{self.uri}/{INDEX_FILE} is not a JSON object: {exc}") from exc
            if not isinstance(weight_map, dict) or not weight_map:
                raise InvalidRequestError(f"{self.uri}/{INDEX_FILE} has no weight_map")
            files = sorted({validate_file_name(str(f)) for f in weight_map.values()})
        else:
            files = [f for f in self.list_files() if f.endswith(".safetensors")]
        if not files:
            raise NotFoundError(f"no *.safetensors files in {self.uri}")
        return files

    def headers(self) -> dict[str, SafetensorsHeader]:
        """Parsed header of every safetensors file (read concurrently, once)."""
        files = self.safetensors_files()
        missing = [f for f in files if f not in self._headers]
        if missing:
            with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:
                for f, header in zip(missing, pool.map(self._read_header, missing), strict=True):
                    self._headers[f] = header
        return {f: self._headers[f] for f in files}

    def tensor_index(self) -> dict[str, TensorLocation]:
        """Tensor name -> (file, entry with absolute byte range), in file then offset order."""
        if self._index is None:
            index: dict[str, TensorLocation] = {}
            for file, header in self.headers().items():
                for name, entry in header.entries.items():
                    if name in index:
                        raise InvalidRequestError(
                            f"tensor {name} appears in both {index[name].file} and {file} ({self.uri})")
                    index[name] = TensorLocation(file, entry)
            self._index = index
        return self._index

    def config(self) -> dict[str, Any]:
        config = self.read_json("config.json")
        if not isinstance(config, dict):
            raise InvalidRequestError(f"{self.uri}/config.json is not an object")
        return config

    def _locations(self, names: Iterable[str] | None) -> dict[str, TensorLocation]:
        index = self.tensor_index()
        if names is None:
            return dict(index)
        wanted = list(names)
        missing = [n for n in wanted if n not in index]
        if missing:
            raise KeyError(f"tensors not in {self.uri}: {missing[:5]}")
        return {n: index[n] for n in wanted}

    @abstractmethod
    def tensor_source(self, names: list[str] | None = None, *, concurrency: int = 8,
                      chunk_bytes: int = 16 * MiB) -> TensorSource:
        """A source of ``names`` (all tensors if None); S3 starts fetching right away."""


class LocalModelFiles(ModelFiles):
    """A model directory on the local file system."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise NotFoundError(f"model directory {path} does not exist")
        self.uri = str(self.path)

    def _file(self, name: str) -> Path:
        path = self.path / validate_file_name(name)
        if not path.is_file():
            raise NotFoundError(f"{path} does not exist")
        return path

    def read_bytes(self, name: str) -> bytes:
        return self._file(name).read_bytes()

    def list_files(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.is_file())

    def _read_header_bytes(self, file: str) -> tuple[bytes, int]:
        path = self._file(file)
        with open(path, "rb") as f:
            prefix = f.read(PREFIX_BYTES)
            n = header_length(prefix, str(path))
            return prefix + f.read(n), path.stat().st_size

    def tensor_source(self, names: list[str] | None = None, *, concurrency: int = 8,
                      chunk_bytes: int = 16 * MiB) -> TensorSource:
        return LocalTensorSource(self.path, names)


class S3ModelFiles(ModelFiles):
    """A model under ``s3://bucket/prefix``, read through :class:`S3Client`."""

    def __init__(self, uri: S3Uri, client: S3Client) -> None:
        super().__init__()
        self.location = uri
        self.client = client
        self.uri = str(uri)
        self._objects: dict[str, ObjectInfo] | None = None
        self._listing_lock = threading.Lock()

    def read_bytes(self, name: str) -> bytes:
        obj = self.location.child(name)
        return self.client.get_object_bytes(obj.bucket, obj.key)

    def objects(self) -> dict[str, ObjectInfo]:
        """File name -> size and ETag, from one LIST shared by every caller (thread-safe)."""
        with self._listing_lock:
            if self._objects is None:
                prefix = f"{self.location.key}/" if self.location.key else ""
                listed = self.client.list_prefix(self.location.bucket, self.location.key)
                named = {o.key[len(prefix):]: o for o in listed}
                objects = {n: o for n, o in sorted(named.items()) if n and "/" not in n}
                if not objects:
                    raise StorageError(f"no model files under {self.uri}", code="no_such_key")
                self._objects = objects
            return self._objects

    def list_files(self) -> list[str]:
        return list(self.objects())

    def _read_index(self) -> bytes | None:
        """GET the index while the LIST runs (a 404 is cheap; a round trip on the cold path is not)."""
        if self._objects is not None:
            return super()._read_index()
        with ThreadPoolExecutor(max_workers=1) as pool:
            speculative = pool.submit(self._read_if_present, INDEX_FILE)
            listed = INDEX_FILE in self.objects()
            data = speculative.result()
        if not listed:
            return None
        return data if data is not None else self.read_bytes(INDEX_FILE)

    def _read_if_present(self, name: str) -> bytes | None:
        try:
            return self.read_bytes(name)
        except NotFoundError:
            return None
        except StorageError as exc:
            if exc.code == "no_such_key":
                return None
            raise

    def _read_header_bytes(self, file: str) -> tuple[bytes, int]:
        obj = self.location.child(file)
        data, size = self.client.get_prefix(obj.bucket, obj.key, HEADER_PROBE_BYTES)
        n = header_length(data, str(obj))
        if PREFIX_BYTES + n > len(data):
            if PREFIX_BYTES + n > size:
                raise InvalidRequestError(f"{obj}: header length {n} exceeds file size {size}")
            rest = self.client.get_range(obj.bucket, obj.key, len(data), PREFIX_BYTES + n)
            data = bytes(data) + bytes(rest)
        return bytes(data), size

    def tensor_source(self, names: list[str] | None = None, *, concurrency: int = 8,
                      chunk_bytes: int = 16 * MiB) -> TensorSource:
        from hydraserve.weights.s3_source import S3TensorSource

        locations = self._locations(names)
        files = {loc.file: self.location.child(loc.file) for loc in locations.values()}
        return S3TensorSource(self.client, files, locations, concurrency=concurrency,
                              chunk_bytes=chunk_bytes)


def open_model(uri: str, endpoint_url: str | None = None, *,
               client: S3Client | None = None) -> ModelFiles:
    """A local directory or ``s3://bucket/prefix`` (validated: no traversal, valid bucket)."""
    if is_s3_uri(uri):
        location = parse_s3_uri(uri)
        return S3ModelFiles(location, client or S3Client(endpoint_url))
    if "://" in uri:
        raise InvalidRequestError(f"unsupported model URI {uri!r} (use a directory or s3://)",
                                  param="model")
    return LocalModelFiles(uri)
