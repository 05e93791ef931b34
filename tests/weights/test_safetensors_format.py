"""Header parsing against files written by safetensors itself, and malformed headers."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydraserve.weights.safetensors_format import (
    DTYPE_SIZES,
    SafetensorsFormatError,
    header_length,
    parse_header,
)
from hydraserve.weights.tensors import TORCH_DTYPES, tensor_view

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (1, 1, 1, 9), (0, 4)]
DTYPES_UNDER_TEST = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8,
                     torch.uint8, torch.bool, torch.float64]


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        return torch.randint(-100 if dtype.is_signed else 0, 100, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def test_every_tensor_matches_safetensors_loader(tmp_path: Path) -> None:
    tensors = {f"t{i}_{j}": _tensor(shape, dtype, i * 100 + j)
               for i, dtype in enumerate(DTYPES_UNDER_TEST) for j, shape in enumerate(SHAPES)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    data = path.read_bytes()

    header = parse_header(data, file="m.safetensors", file_size=len(data))

    assert header.metadata == {"format": "pt"}
    assert set(header.entries) == set(tensors)
    assert header.data_end == len(data)
    reference = load_file(str(path))
    buf = bytearray(data)
    for name, entry in header.entries.items():
        assert entry.shape == tuple(reference[name].shape) and entry.file == "m.safetensors"
        assert TORCH_DTYPES[entry.dtype] == reference[name].dtype
        got = tensor_view(entry, buf, entry.start)
        assert got.dtype == reference[name].dtype and got.shape == reference[name].shape
        assert torch.equal(got, reference[name]), name


def test_entries_are_in_offset_order_and_tile_the_data(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"b": torch.zeros(10), "a": torch.ones(3, dtype=torch.bfloat16)}, str(path))
    header = parse_header(path.read_bytes())
    entries = list(header.entries.values())
    assert entries[0].start == header.data_start
    assert all(x.end == y.start for x, y in itertools.pairwise(entries))


def _file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(("header", "match"), [
    ({"x": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, "unsupported dtype"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "expected 8"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, "overlaps"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "past the end"),
    ({"x": [1, 2]}, "not an object"),
    ({"__metadata__": {"a": 1}}, "__metadata__"),
])
def test_malformed_headers_are_rejected_with_a_reason(header: dict, match: str) -> None:
    data = _file(header, b"\0" * 8)
    with pytest.raises(SafetensorsFormatError, match=match):
        parse_header(data, file_size=len(data), source="s3://b/m.safetensors")


def test_bad_lengths_and_json() -> None:
    with pytest.raises(SafetensorsFormatError, match="too short"):
        header_length(b"\1\2")
    with pytest.raises(SafetensorsFormatError, match="not in"):
        header_length(struct.pack("<Q", 200 * 1024 * 1024))
    with pytest.raises(SafetensorsFormatError, match="only 3 were given"):
        parse_header(struct.pack("<Q", 50) + b"{}x")
    with pytest.raises(SafetensorsFormatError, match="not valid JSON"):
        parse_header(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(SafetensorsFormatError, match="exceeds file size"):
        parse_header(_file({}), file_size=5)


def test_all_declared_dtypes_map_to_matching_item_sizes() -> None:
    assert set(DTYPE_SIZES) == set(TORCH_DTYPES)
    for name, itemsize in DTYPE_SIZES.items():
        assert torch.empty((), dtype=TORCH_DTYPES[name]).element_size() == itemsize, name
