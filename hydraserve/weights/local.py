"""Tensors of a local Hugging Face model directory, memory-mapped (no copy).

Made by :meth:`hydraserve.weights.model_files.ModelFiles.tensor_source` for a local directory
(or directly by the runtime and tests). Shard names from ``model.safetensors.index.json`` are
validated, so an index cannot point outside the directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from hydraserve.weights.s3_uri import validate_file_name


class LocalTensorSource:
    """TensorSource over the *.safetensors files of a directory (sharded or not).

    ``names`` restricts the source to a subset (a stage's tensors); unknown names raise KeyError.
    """

    def __init__(self, model_dir: str | Path, names: Iterable[str] | None = None) -> None:
        self._dir = Path(model_dir)
        index_path = self._dir / "model.safetensors.index.json"
        if index_path.exists():
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self._dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {self._dir}")
        self._handles = {f: safe_open(str(self._dir / validate_file_name(f)), framework="pt")
                         for f in files}
        self._file_of: dict[str, str] = {}
        for f, handle in self._handles.items():
            for name in handle.keys():  # safe_open has no __iter__
                self._file_of[name] = f
        if names is not None:
            wanted = list(names)
            missing = [n for n in wanted if n not in self._file_of]
            if missing:
                raise KeyError(f"tensors not in {self._dir}: {missing[:5]}")
            self._file_of = {n: self._file_of[n] for n in wanted}

    def tensor_names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file_of[name]].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
