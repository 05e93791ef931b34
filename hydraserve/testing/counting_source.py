"""A tensor source for tests that must see what a loader asked for."""

from __future__ import annotations

from pathlib import Path

import torch

from hydraserve.weights.local import LocalTensorSource


class CountingSource(LocalTensorSource):
    """The real local source (memory-mapped safetensors), remembering which tensors were read."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.requested: list[str] = []

    def get(self, name: str) -> torch.Tensor:
        self.requested.append(name)
        return super().get(name)
