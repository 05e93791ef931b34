"""The one record of where a tensor's bytes are: name, dtype, shape, file and byte range.

Made by the safetensors header parser (hydraserve.weights.safetensors_format) and used
unchanged by everything after it: the stage slicer, loaderd's segment layouts, the fetch
engine, the runtime's tensor sources and loaderd's ``GET /v1/index`` answer. A stdlib dataclass
(not a pydantic model) because the fetch path touches it per chunk; pydantic validates it as a
field of the loader API's models all the same.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorEntry:
    """Tensor ``name`` of ``file``: safetensors ``dtype`` (F32, BF16, ...), ``shape``, and its
    absolute byte range [start, end) in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start
