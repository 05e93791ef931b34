"""The one way a model's files become tensors: ``tensor_source(files, names)``.

A function of the files rather than their method, so that the files' byte side
(hydraserve.weights.model_files: what loaderd and the placement service read, which never import
torch) knows nothing of tensors. Each kind of files registers how its tensors are read
(``functools.singledispatch``, the most specific kind wins): a local directory's as views of its
memory-mapped files, an S3 model's through the fetch engine (each tensor checked against the
manifest's sha256 as it lands, into anonymous memory, first layers first), a download-first
model's from its downloaded copy (the serverless-vLLM baseline), and a loaderd's from its shared
memory (those files' own ``tensor_source``: hydraserve.runtime.loader_files, which must stay
light until tensors are asked for: its read-ahead starts while torch still imports).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from hydraserve.weights.download_first import DownloadFirstModelFiles
from hydraserve.weights.fetched_source import FetchedTensorSource
from hydraserve.weights.local import LocalTensorSource
from hydraserve.weights.model_files import LocalModelFiles, ModelFiles, S3ModelFiles
from hydraserve.weights.source import TensorSource


@functools.singledispatch
def tensor_source(files: ModelFiles, names: Sequence[str], *, background: bool = False, **tuning: Any) -> TensorSource:
    """A source of exactly ``names`` of ``files`` (KeyError for others); fetching starts at once
    (``background``: behind every cold start's bytes, where the source can tell them apart;
    ``tuning``: the fetch engine's ``concurrency`` and ``chunk_bytes`` for an S3 model). Files
    that read their own tensors (a loaderd's: hydraserve.runtime.loader_files) have a
    ``tensor_source`` method, used here."""
    own = getattr(files, "tensor_source", None)
    if own is None:
        raise TypeError(f"no tensor source for {type(files).__name__}")
    source: TensorSource = own(names, background=background)
    return source


@tensor_source.register
def _local(files: LocalModelFiles, names: Sequence[str], *, background: bool = False, **tuning: Any) -> TensorSource:
    return LocalTensorSource(files.path, names)


@tensor_source.register
def _s3(files: S3ModelFiles, names: Sequence[str], *, background: bool = False, concurrency: int | None = None,
        chunk_bytes: int | None = None) -> TensorSource:
    return FetchedTensorSource(files.version(), files, names, concurrency=concurrency, chunk_bytes=chunk_bytes)


@tensor_source.register
def _downloaded(files: DownloadFirstModelFiles, names: Sequence[str], *, background: bool = False,
                **tuning: Any) -> TensorSource:
    return LocalTensorSource(files.download(), names)
