"""The safetensors file format, from bytes: header parsing and validation (no torch).

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` and then
the raw tensor bytes; offsets are relative to the end of the header. Parsing only needs the
first 8 + N bytes, so one ranged GET of a file's start gives every tensor's absolute byte
range. Callers: :mod:`hydraserve.weights.model_files` (tensor index), push manifests, loaderd.
No torch here (loaderd never imports it): :mod:`hydraserve.weights.tensors` turns bytes into tensors.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from hydraserve.contracts.tensors import TensorEntry
from hydraserve.errors import SafetensorsFormatError

MAX_HEADER_BYTES = 100 * 1024 * 1024
PREFIX_BYTES = 8

# safetensors dtype name -> bytes per element (hydraserve.weights.tensors has the torch dtypes)
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: entries in file (offset) order, where the data section starts."""

    header_len: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str] | None = None

    @property
    def data_start(self) -> int:
        return PREFIX_BYTES + self.header_len

    @property
    def data_end(self) -> int:
        """Absolute end of the last tensor (the file's expected size)."""
        return max((e.end for e in self.entries.values()), default=self.data_start)


def header_length(prefix: bytes, source: str = "safetensors file") -> int:
    """N from the first 8 bytes; rejects absurd sizes before anything else is read."""
    if len(prefix) < PREFIX_BYTES:
        raise SafetensorsFormatError(f"{source}: {len(prefix)} bytes, too short for a header")
    (n,) = struct.unpack("<Q", prefix[:PREFIX_BYTES])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(
            f"{source}: header length {n} is not in [2, {MAX_HEADER_BYTES}] (not safetensors?)")
    return int(n)


def parse_header(data: bytes | bytearray | memoryview, *, file: str = "model.safetensors",
                 file_size: int | None = None, source: str = "safetensors file") -> SafetensorsHeader:
    """Parse and validate the header from the file's first bytes (at least 8 + N of them).

    Checks: JSON object; known dtypes; non-negative integer shapes; each range's size equals
    prod(shape) x itemsize; ranges do not overlap; and, if ``file_size`` is known, every range
    lies inside the file. Entries name ``file`` (the shard's name in the model directory).
    """
    raw = bytes(data[: PREFIX_BYTES + MAX_HEADER_BYTES])
    n = header_length(raw, source)
    if len(raw) < PREFIX_BYTES + n:
        raise SafetensorsFormatError(
            f"{source}: header is {n} bytes but only {len(raw) - PREFIX_BYTES} were given")
    if file_size is not None and PREFIX_BYTES + n > file_size:
        raise SafetensorsFormatError(f"{source}: header length {n} exceeds file size {file_size}")
    try:
        obj = json.loads(raw[PREFIX_BYTES:PREFIX_BYTES + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"{source}: header is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise SafetensorsFormatError(f"{source}: header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise SafetensorsFormatError(f"{source}: __metadata__ must map strings to strings")
    data_start = PREFIX_BYTES + n
    entries = [_entry(name, spec, file, data_start, source) for name, spec in obj.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    previous_end = data_start
    for entry in entries:
        if entry.start < previous_end:
            raise SafetensorsFormatError(f"{source}: tensor {entry.name!r} overlaps the previous one")
        previous_end = max(previous_end, entry.end)
        if file_size is not None and entry.end > file_size:
            raise SafetensorsFormatError(
                f"{source}: tensor {entry.name!r} ends at byte {entry.end}, past the end of "
                f"the file ({file_size} bytes): truncated?")
    return SafetensorsHeader(header_len=n, entries={e.name: e for e in entries}, metadata=metadata)


def _entry(name: str, spec: object, file: str, data_start: int, source: str) -> TensorEntry:
    where = f"{source}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise SafetensorsFormatError(f"{where}: entry is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SafetensorsFormatError(f"{where}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise SafetensorsFormatError(f"{where}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
        raise SafetensorsFormatError(f"{where}: bad data_offsets {offsets!r}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        raise SafetensorsFormatError(
            f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype} "
            f"(expected {expected})")
    return TensorEntry(name, dtype, tuple(shape), file, data_start + offsets[0], data_start + offsets[1])
