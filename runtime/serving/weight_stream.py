"""A stage's weights, tensor by tensor as their bytes land: what our vLLM load format feeds vLLM.

Called by the ``hydraserve`` load format (hydraserve.runtime.serving.loader) with vLLM's
``model.load_weights``; no vLLM here. The tensors of the stage come in streaming order (the
order loaderd fetches them: embeddings, layer 0, 1, ..., head), each handed over only once its
readiness byte says all its bytes are in, so vLLM's set-up runs while the rest arrive and no
tensor is ever read half-written. If the node's loaderd stops answering while bytes are still
arriving (killed, restarted), the remaining tensors are fetched from S3 by this process with
the same fetch engine (``loaderd_fallback`` on the timeline); any other failure (a fetch that
failed in loaderd, a truncated segment) is raised, naming the tensor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.errors import UnreachableError
from hydraserve.weights.model_files import ModelFiles
from hydraserve.weights.source import TensorSource
from hydraserve.weights.tensor_sources import tensor_source

log = logging.getLogger(__name__)
Load = Callable[[Iterable[tuple[str, Any]]], Any]


def stream_weights(files: ModelFiles, stage: StageSpec, load: Load, timeline: Timeline) -> Any:
    """``load`` (vLLM's model.load_weights) over the stage's tensors as they land; its result.

    Marks weights_attached, first_tensor_loaded, [loaderd_fallback], weights_loaded."""
    names = files.stage_tensor_names(stage)
    stream = _Stream(files, names, timeline)
    timeline.mark(Moment.WEIGHTS_ATTACHED, via=stream.via, stage=stage.index, tensors=len(names))
    try:
        result = load(stream)
        if stream.handed < len(names):
            raise ValueError(f"the model's load_weights stopped after {stream.handed} of {len(names)} tensors")
    finally:
        stream.close()
    timeline.mark(Moment.WEIGHTS_LOADED, waited_for_bytes_s=round(stream.waited_s, 3), via=stream.via)
    return result


class _Stream:
    """The iterable handed to ``load``: one source, and S3's in its place if loaderd goes."""

    def __init__(self, files: ModelFiles, names: list[str], timeline: Timeline) -> None:
        self._files = files
        self._names = names
        self._timeline = timeline
        self._sources: list[TensorSource] = [tensor_source(files, names)]
        self.via = getattr(self._sources[0], "via", None) or "local"
        self.handed = 0
        self.waited_s = 0.0

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for i, name in enumerate(self._names):
            started = time.monotonic()
            tensor = self._get(i, name)
            self.waited_s += time.monotonic() - started
            if self.handed == 0:
                self._timeline.mark(Moment.FIRST_TENSOR_LOADED)
            self.handed += 1
            yield name, tensor

    def _get(self, i: int, name: str) -> Any:
        try:
            return self._sources[-1].get(name)
        except UnreachableError as exc:
            fallback = getattr(self._files, "fallback_source", None)
            if fallback is None:
                raise
            rest = self._names[i:]
            log.warning("loaderd went away mid-load: %s; the %d remaining tensors come from S3", exc.message, len(rest))
            self._timeline.mark(Moment.LOADERD_FALLBACK, reason=exc.message, tensors=len(rest))
            self._sources.append(fallback(rest))
            self.via = "loaderd+s3"
            return self._sources[-1].get(name)

    def close(self) -> None:
        for source in self._sources:
            source.close()
