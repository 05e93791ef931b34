"""The one interface model loading reads weights through.

Implementations: a local HF directory (memory-mapped safetensors), S3 (ranged GETs of exactly
the tensors asked for) and loaderd shared memory (zero-copy views that may block until the
tensor's bytes have landed). The runtime's model loader only sees this protocol, so it does
not care where bytes come from or whether they are still arriving.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors of one model checkpoint."""

    def tensor_names(self) -> list[str]:
        """Every tensor name in the checkpoint (all shards), in file order."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor with its checkpoint dtype and shape; blocks until its bytes are available.

        Raises KeyError for an unknown name. The returned tensor may be a read-only view of
        shared memory: callers must not write into it.
        """
        ...

    def close(self) -> None:
        """Release files, mappings and connections."""
        ...
