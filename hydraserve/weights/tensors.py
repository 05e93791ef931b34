"""Bytes -> torch tensors without a copy: the safetensors dtype table and zero-copy views.

Used by the tensor sources (segments filled by loaderd or by this process's fetch engine).
The only weights module that imports torch next to local.py; loaderd imports neither.
"""

from __future__ import annotations

import math
import mmap
import warnings

import torch

from hydraserve.contracts.tensors import TensorEntry

# safetensors dtype name -> torch dtype (sizes: hydraserve.weights.safetensors_format.DTYPE_SIZES)
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def tensor_view(entry: TensorEntry, buffer: bytearray | memoryview | mmap.mmap, offset: int) -> torch.Tensor:
    """``entry``'s tensor viewing its bytes at ``offset`` of ``buffer`` (no copy; it keeps the
    buffer alive). A read-only buffer gives a read-only tensor: callers must not write to it."""
    dtype = TORCH_DTYPES.get(entry.dtype)
    if dtype is None:
        raise TypeError(f"tensor {entry.name}: unsupported dtype {entry.dtype}")
    numel = math.prod(entry.shape)
    if numel == 0:
        return torch.empty(entry.shape, dtype=dtype)
    if len(buffer) < offset + entry.nbytes:
        raise ValueError(f"buffer too small for {entry.name}")
    with warnings.catch_warnings():  # "the given buffer is not writable": read-only by contract
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=offset)
    return flat.view(entry.shape)
