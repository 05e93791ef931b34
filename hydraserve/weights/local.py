"""Tensors of a local Hugging Face model directory, memory-mapped (no copy)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class LocalTensorSource:
    """TensorSource over the *.safetensors files of a directory (sharded or not)."""

    def __init__(self, model_dir: str | Path) -> None:
        self._dir = Path(model_dir)
        index_path = self._dir / "model.safetensors.index.json"
        if index_path.exists():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self._dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {self._dir}")
        self._handles = {f: safe_open(str(self._dir / f), framework="pt") for f in files}
        self._file_of: dict[str, str] = {}
        for f, handle in self._handles.items():
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                self._file_of[name] = f

    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
