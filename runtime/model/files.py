"""One seam for "read config/tokenizer text + get a TensorSource", local directory or s3:// URI.

Called by the engine factory and ``hydraserve generate``. Local directories are read here;
s3:// URIs go through hydraserve.weights.model_files.open_model (the S3 side's object with the
same two methods), imported only when an S3 URI is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from hydraserve.weights.source import TensorSource


class ModelFiles(Protocol):
    """The files of one HF model directory, wherever they live."""

    def read_text(self, name: str) -> str:
        """A small file (config.json, tokenizer.json, ...); FileNotFoundError if absent."""
        ...

    def tensor_source(self, names: list[str] | None = None) -> TensorSource:
        """The checkpoint's tensors; ``names`` hints which will be read (prefetch only those)."""
        ...


class LocalModelFiles:
    """A model directory on the local filesystem (safetensors memory-mapped)."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir)
        if not (self.root / "config.json").is_file():
            raise FileNotFoundError(f"{self.root} has no config.json (not a model directory)")

    def read_text(self, name: str) -> str:
        return (self.root / name).read_text(encoding="utf-8")

    def tensor_source(self, names: list[str] | None = None) -> TensorSource:
        from hydraserve.weights.local import LocalTensorSource

        return LocalTensorSource(self.root)


def open_model_files(uri: str | Path, endpoint_url: str | None = None) -> ModelFiles:
    """ModelFiles for a local directory or an ``s3://bucket/prefix`` URI."""
    if str(uri).startswith("s3://"):
        from hydraserve.weights.model_files import open_model

        files: ModelFiles = open_model(str(uri), endpoint_url=endpoint_url)
        return files
    return LocalModelFiles(uri)


def read_optional(files: ModelFiles, name: str) -> str | None:
    """A file's text, or None if the model does not have it (other storage errors propagate)."""
    from hydraserve.errors import NotFoundError, StorageError

    try:
        return files.read_text(name)
    except (FileNotFoundError, KeyError, NotFoundError):
        return None
    except StorageError as exc:  # S3: a missing key is "absent", a denied one is an error
        if exc.code == "no_such_key":
            return None
        raise
