"""Frames on the stage transport: a small JSON header, then raw tensor bytes. Never pickle.

Layout: ``b"HSPF"`` | u32 header length | header (UTF-8 JSON object) | tensor bytes. The header
names the frame's ``kind`` and carries its fields; ``tensors`` lists each tensor's safetensors
dtype and shape, and the payload is their bytes back to back in that order. Everything read is
checked before it is used: the magic, a header of at most 1 MiB that is a JSON object, known
dtypes, non-negative integer shapes and a payload within ``max_payload``; anything else (or a
connection that ends inside a frame) is a StageTransportError naming what was wrong. Used by
hydraserve.runtime.transport.link (inner stages) and .group (the head).
"""

from __future__ import annotations

import json
import math
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from hydraserve.errors import StageTransportError
from hydraserve.weights.safetensors_format import DTYPE_SIZES
from hydraserve.weights.tensors import TORCH_DTYPES

MAGIC = b"HSPF"
_PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_PAYLOAD = 1 << 30
_NAME_OF = {dtype: name for name, dtype in TORCH_DTYPES.items()}


@dataclass
class Frame:
    """One message: its kind, header fields and tensors (in order)."""

    kind: str
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)


def encode(frame: Frame) -> list[memoryview | bytes]:
    """The frame as buffers to send in order (tensor bytes are not copied)."""
    tensors = [t.detach().contiguous() for t in frame.tensors]
    specs = []
    for t in tensors:
        if t.dtype not in _NAME_OF:
            raise StageTransportError(f"cannot send a {t.dtype} tensor over the stage transport")
        specs.append({"dtype": _NAME_OF[t.dtype], "shape": list(t.shape)})
    header = json.dumps({**frame.fields, "kind": frame.kind, "tensors": specs}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise StageTransportError(f"frame header of {len(header)} B exceeds {MAX_HEADER_BYTES} B")
    parts: list[memoryview | bytes] = [_PREFIX.pack(MAGIC, len(header)), header]
    parts += [t.view(torch.uint8).numpy().data.cast("B") for t in tensors if t.numel()]
    return parts


def send(sock: socket.socket, frame: Frame) -> None:
    """One scatter-gather write per frame where the kernel takes it all (small frames: one
    segment, one wake-up of the peer), resumed where it stopped otherwise."""
    parts = [memoryview(p).cast("B") for p in encode(frame)]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]


def recv_exactly(sock: socket.socket, n: int, what: str, have: int = 0) -> bytearray:
    """``n`` more bytes of a ``what`` of which ``have`` bytes were read already."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise StageTransportError(f"the stage link closed after {have + got} of the {have + n} B of a {what}")
        got += k
    return buf


def recv(sock: socket.socket, *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Frame | None:
    """The next frame, or None if the peer closed the link between frames."""
    first = sock.recv(_PREFIX.size)
    if not first:
        return None
    if len(first) < _PREFIX.size:
        first += recv_exactly(sock, _PREFIX.size - len(first), "frame prefix", len(first))
    magic, header_len = _PREFIX.unpack(first)
    if magic != MAGIC:
        raise StageTransportError(f"not a stage-transport frame (magic {magic!r})")
    if header_len > MAX_HEADER_BYTES:
        raise StageTransportError(f"frame header of {header_len} B exceeds {MAX_HEADER_BYTES} B")
    header = parse_header(bytes(recv_exactly(sock, header_len, "frame header")), max_payload=max_payload)
    kind, specs, fields = header
    tensors = []
    for dtype, shape in specs:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        data = recv_exactly(sock, nbytes, "tensor") if nbytes else bytearray()
        tensor = torch.frombuffer(data, dtype=TORCH_DTYPES[dtype]) if nbytes else torch.empty(0, dtype=TORCH_DTYPES[dtype])
        tensors.append(tensor.view(shape))
    return Frame(kind, fields, tensors)


def parse_header(raw: bytes, *, max_payload: int = DEFAULT_MAX_PAYLOAD
                 ) -> tuple[str, list[tuple[str, tuple[int, ...]]], dict[str, Any]]:
    """(kind, [(dtype, shape)], other fields) of a header, checked (StageTransportError)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageTransportError(f"frame header is not JSON: {exc}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise StageTransportError("frame header is not an object with a kind")
    specs_raw = obj.pop("tensors", [])
    if not isinstance(specs_raw, list):
        raise StageTransportError("frame header's tensors is not a list")
    specs: list[tuple[str, tuple[int, ...]]] = []
    total = 0
    for spec in specs_raw:
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if dtype not in DTYPE_SIZES:
            raise StageTransportError(f"frame tensor has an unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise StageTransportError(f"frame tensor has a bad shape {shape!r}")
        total += math.prod(shape) * DTYPE_SIZES[dtype]
        if total > max_payload:
            raise StageTransportError(f"frame payload exceeds {max_payload} B")
        specs.append((dtype, tuple(shape)))
    return obj.pop("kind"), specs, obj
