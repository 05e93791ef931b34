"""One model, wherever it is read from: its small files, tensor index and tensors.

:class:`ModelFiles` is what every reader of a model offers: config and tokenizer files and the
tensor index (their tensors: hydraserve.weights.tensor_sources, the torch side). Three kinds exist: a
local directory and an ``s3://bucket/prefix`` (:class:`StoredModelFiles`: the HF layout as
users have it, config.json, tokenizer files, *.safetensors, optional
model.safetensors.index.json), and the node's loaderd (hydraserve.runtime.loader_files).
``open_model(uri)`` opens the stored kinds. Callers: the runtime, loaderd (index, byte
ranges, checks), the placement's model description, ``hydraserve generate``. In S3 each
safetensors header is read with one ranged GET of the file's first 64 KiB (a second only for
a longer header).
A stored model is also a range reader for that engine (``read_into``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydraserve.contracts.model import MANIFEST_FILE
from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.tensors import TensorEntry
from hydraserve.errors import HydraError, InvalidRequestError, MissingObjectError, NotFoundError, StorageError
from hydraserve.weights.architectures import Architecture
from hydraserve.weights.layout import num_layers_in, stage_tensors
from hydraserve.weights.s3_uri import ObjectInfo, S3Uri, is_s3_uri, parse_s3_uri, validate_file_name
from hydraserve.weights.safetensors_format import (
    PREFIX_BYTES,
    SafetensorsHeader,
    header_length,
    parse_header,
)

if TYPE_CHECKING:  # boto3 (hydraserve.weights.s3) is imported only when an s3:// model is opened
    import threading as _threading

    from hydraserve.weights.model_version import ModelVersion
    from hydraserve.weights.s3 import S3Client

INDEX_FILE = "model.safetensors.index.json"
HEADER_PROBE_BYTES = 64 * 1024


class ModelFiles(ABC):
    """The files of one model as a worker reads them."""

    uri: str
    _config: dict[str, Any] | None = None  # config.json, once read

    def release_leases(self) -> None:
        """Give back what these files hold outside this process (a loaderd's leases); nothing
        by default."""
        return None

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """A whole small file (config, tokenizer, index); MissingObjectError if the model has no
        such file."""

    @abstractmethod
    def tensor_index(self) -> dict[str, TensorEntry]:
        """Every tensor of the checkpoint (all shards) with its byte range, in file order."""

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_optional(self, name: str) -> str | None:
        """A file's text, or None if the model does not have it (other errors propagate)."""
        try:
            return self.read_text(name)
        except MissingObjectError:  # absent; a denied one is an error
            return None

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{self.uri}/{name} is not valid JSON: {exc}") from exc

    def config(self) -> dict[str, Any]:
        """config.json (read once)."""
        if self._config is None:
            config = self.read_json("config.json")
            if not isinstance(config, dict):
                raise InvalidRequestError(f"{self.uri}/config.json is not an object")
            self._config = config
        return dict(self._config)

    def architecture(self) -> Architecture:
        return Architecture.from_config(self.config())

    def stage_tensor_names(self, stage: StageSpec | None = None) -> list[str]:
        """The tensors ``stage`` (default: the whole model) holds, by the stage slicer."""
        index = self.tensor_index()
        arch = self.architecture()
        return stage_tensors(index, stage or StageSpec.whole(max(1, num_layers_in(index, arch))), arch)


class StoredModelFiles(ModelFiles):
    """A model stored as files (a directory, an S3 prefix); index and headers read once."""

    kind = "s3"  # as a range reader of the fetch engine (metrics label)

    def __init__(self) -> None:
        self._index: dict[str, TensorEntry] | None = None
        self._headers: dict[str, SafetensorsHeader] = {}
        self._raw_headers: dict[str, bytes] = {}  # exactly bytes [0, data_start) of each file
        self._shards: list[str] | None = None
        self._shards_lock = threading.Lock()
        self._version: ModelVersion | None = None
        self._version_lock = threading.Lock()

    @property
    def label(self) -> str:
        return self.uri

    def version(self) -> ModelVersion:
        """The version these files hold, resolved and checked on first use (then cached)."""
        with self._version_lock:
            if self._version is None:
                from hydraserve.weights.model_version import resolve_version

                self._version = resolve_version(self)
            return self._version

    @abstractmethod
    def objects(self) -> dict[str, ObjectInfo]:
        """File name -> size and ETag of the files directly in the model directory, sorted."""

    @abstractmethod
    def _read_header_bytes(self, file: str) -> tuple[bytes, int]:
        """At least the first 8 + N bytes of a safetensors file, and the file's size."""

    @abstractmethod
    def read_into(self, file: str, start: int, out: memoryview,
                  cancel: _threading.Event | None = None) -> None:
        """Bytes [start, start + len(out)) of a model file into ``out`` (retried where it can be)."""

    @abstractmethod
    def fingerprint(self, fresh: bool = False) -> str:
        """A digest that changes whenever the model's files do, from what was read already, or
        (``fresh``) asked of the store now at the least cost it allows."""

    def read(self, file: str, start: int, end: int, cancel: _threading.Event | None = None) -> bytes:
        out = bytearray(end - start)
        self.read_into(file, start, memoryview(out), cancel)
        return bytes(out)

    def list_files(self) -> list[str]:
        return list(self.objects())

    def exists(self, name: str) -> bool:
        return validate_file_name(name) in self.objects()

    def _read_index(self) -> bytes | None:
        """model.safetensors.index.json, or None when the model has no index."""
        return self.read_bytes(INDEX_FILE) if self.exists(INDEX_FILE) else None

    def _read_header(self, file: str) -> SafetensorsHeader:
        data, size = self._read_header_bytes(file)
        header = parse_header(data, file=file, file_size=size, source=f"{self.uri}/{file}")
        self._raw_headers[file] = bytes(data[:header.data_start])
        return header

    def header_bytes(self, file: str) -> bytes:
        """The file's 8-byte length and JSON header exactly as stored (for sha256 checks);
        kept from the read that parsed it, so checking costs no second GET."""
        self.headers()
        return self._raw_headers[file]

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
            files = [f for f in self.objects() if f.endswith(".safetensors")]
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

    def tensor_index(self) -> dict[str, TensorEntry]:
        if self._index is None:
            index: dict[str, TensorEntry] = {}
            for file, header in self.headers().items():
                for name, entry in header.entries.items():
                    if name in index:
                        raise InvalidRequestError(
                            f"tensor {name} appears in both {index[name].file} and {file} ({self.uri})")
                    index[name] = entry
            self._index = index
        return self._index

    def _listing_digest(self, objects: dict[str, ObjectInfo]) -> str:
        digest = hashlib.sha256()
        for name, obj in sorted(objects.items()):
            digest.update(f"{name}:{obj.size}:{obj.etag}\0".encode())
        return digest.hexdigest()[:16]


class LocalModelFiles(StoredModelFiles):
    """A model directory on the local file system (tensors memory-mapped, no copy)."""

    kind = "local"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise MissingObjectError(f"model directory {path} does not exist")
        self.uri = str(self.path)

    def _file(self, name: str) -> Path:
        path = self.path / validate_file_name(name)
        if not path.is_file():
            raise MissingObjectError(f"{path} does not exist")
        return path

    def read_bytes(self, name: str) -> bytes:
        return self._file(name).read_bytes()

    def objects(self) -> dict[str, ObjectInfo]:
        return {p.name: ObjectInfo(p.name, p.stat().st_size) for p in sorted(self.path.iterdir()) if p.is_file()}

    def fingerprint(self, fresh: bool = False) -> str:
        """Names, sizes and modification times (a stat of the directory: always fresh)."""
        stamps = {p.name: ObjectInfo(p.name, p.stat().st_size, str(p.stat().st_mtime_ns))
                  for p in self.path.iterdir() if p.is_file()}
        return self._listing_digest(stamps)

    def _read_header_bytes(self, file: str) -> tuple[bytes, int]:
        path = self._file(file)
        with open(path, "rb") as f:
            prefix = f.read(PREFIX_BYTES)
            n = header_length(prefix, str(path))
            return prefix + f.read(n), path.stat().st_size

    def read_into(self, file: str, start: int, out: memoryview,
                  cancel: _threading.Event | None = None) -> None:
        with open(self._file(file), "rb") as f:
            f.seek(start)
            if f.readinto(out) != len(out):
                raise StorageError(f"{self.path / file} is shorter than [{start}, {start + len(out)})")


class S3ModelFiles(StoredModelFiles):
    """A model under ``s3://bucket/prefix``, read through :class:`S3Client`."""

    def __init__(self, uri: S3Uri, client: S3Client) -> None:
        super().__init__()
        self.location = uri
        self.client = client
        self.uri = str(uri)
        self._objects: dict[str, ObjectInfo] | None = None
        self._list_error: HydraError | None = None
        self._listing_lock = threading.Lock()

    def read_bytes(self, name: str) -> bytes:
        obj = self.location.child(name)
        return self.client.get_object_bytes(obj.bucket, obj.key)

    def objects(self) -> dict[str, ObjectInfo]:
        """From one LIST shared by every caller (thread-safe). A LIST that failed (its retry
        budget spent) fails every caller the same way: none starts a budget of its own."""
        with self._listing_lock:
            if self._list_error is not None:
                raise self._list_error
            if self._objects is None:
                try:
                    self._objects = self._list()
                except HydraError as exc:
                    self._list_error = exc
                    raise
            return self._objects

    def _list(self) -> dict[str, ObjectInfo]:
        prefix = f"{self.location.key}/" if self.location.key else ""
        listed = self.client.list_prefix(self.location.bucket, self.location.key)
        named = {o.key[len(prefix):]: o for o in listed}
        objects = {n: o for n, o in sorted(named.items()) if n and "/" not in n}
        if not objects:
            raise MissingObjectError(f"no model files under {self.uri}")
        return objects

    def fingerprint(self, fresh: bool = False) -> str:
        """The manifest's ETag when the model has one (a push deletes it first and writes it
        last, so it changes with any file): one HEAD when ``fresh``. Without a manifest, the
        listing's sizes and ETags: one LIST when ``fresh``."""
        objects = self.objects()
        if MANIFEST_FILE in objects:
            if not fresh:
                return f"manifest:{objects[MANIFEST_FILE].etag}"
            obj = self.location.child(MANIFEST_FILE)
            try:
                return f"manifest:{self.client.head(obj.bucket, obj.key).etag}"
            except MissingObjectError:
                return "manifest:gone"
        return self._listing_digest(self._list() if fresh else objects)

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
        except MissingObjectError:
            return None

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

    def read_into(self, file: str, start: int, out: memoryview,
                  cancel: _threading.Event | None = None) -> None:
        obj = self.location.child(file)
        self.client.get_range_into(obj.bucket, obj.key, start, out, cancel=cancel)


def open_model(uri: str, endpoint_url: str | None = None, *,
               client: S3Client | None = None) -> StoredModelFiles:
    """A local directory or ``s3://bucket/prefix`` (validated: no traversal, valid bucket)."""
    if is_s3_uri(uri):
        from hydraserve.weights.s3 import S3Client

        location = parse_s3_uri(uri)
        return S3ModelFiles(location, client or S3Client(endpoint_url))
    if "://" in uri:
        raise InvalidRequestError(f"unsupported model URI {uri!r} (use a directory or s3://)",
                                  param="model")
    return LocalModelFiles(uri)
