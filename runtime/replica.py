"""An inner full stage becomes a standalone replica when its group consolidates.

A pipeline group may give more than its head memory for the whole model (the plan's full
workers, stages 0..a-1). The head consolidates (runtime/consolidation.py); each other full
stage, while it still serves its layers to the ring, grows into the whole model the same way
(``grow_to_whole``: the layers it lacks through its loaderd at background priority, its own
reused), reads the tokenizer and builds and warms its own engine. Once the head releases the
ring, the worker serves the OpenAI and CloudEvents API on its own (``take_over``): one group
of p workers becomes a replicas, as HydraServe's full workers do. The build begins only after
the group's first request (the head's warm-up is the ring's first step) so that request's
prefill does not share the cores with it. A failed build leaves the stage serving the ring;
after the release the worker then drains (its launcher stops it and frees its memory).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hydraserve.contracts.timeline import Timeline
from hydraserve.runtime.consolidation import grow_to_whole
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.factory import LoadedStage
from hydraserve.runtime.model.config import ModelConfig
from hydraserve.runtime.transport.link import StageLink
from hydraserve.weights.model_files import ModelFiles
from hydraserve.weights.source import TensorSource

log = logging.getLogger(__name__)

WARM_UP_STEPS = 1  # the head's warm-up request: one prefill step round the ring


class ReplicaBuilder:
    """Builds the replica's engine in its own thread (``start``); ``take_over`` hands it out."""

    def __init__(self, link: StageLink, files: ModelFiles, config: ModelConfig, timeline: Timeline,
                 start_engine: Callable[[LoadedStage], LLMEngine], *, poll_s: float = 0.05) -> None:
        self._link = link
        self._files = files
        self._config = config
        self._timeline = timeline
        self._start_engine = start_engine
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()  # the engine is handed over or shut down, never both
        self.engine: LLMEngine | None = None
        self.failed: str | None = None
        self.source: TensorSource | None = None  # the missing layers' bytes (kept open while serving)
        self._thread = threading.Thread(target=self._run, name="replica-build", daemon=True)

    def start(self) -> ReplicaBuilder:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while self._link.steps <= WARM_UP_STEPS and not self._link.released:
                if self._stop.wait(self._poll_s) or self._link.failed:
                    return
            whole, self.source = grow_to_whole(self._link.runner.model, self._files, self._timeline)
            if self._stop.is_set() or self._link.failed:  # the group ended meanwhile: no engine to build
                self._close_source()
                return
            engine = self._start_engine(LoadedStage(self._config, whole, self.source))
            with self._lock:
                stopped = self._stop.is_set()
                if not stopped:
                    self.engine = engine
            if stopped:
                engine.shutdown(drain=False, timeout=5)
                self._close_source()
                return
            self._timeline.mark("replica_built")
        except Exception as exc:  # the stage keeps serving its ring
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("building the replica failed; the stage keeps serving the group")
            self._timeline.mark("replica_failed", reason=self.failed)
            self._close_source()
        finally:
            self._done.set()

    def _close_source(self) -> None:
        if self.source is not None:
            self.source.close()  # loaderd's views of the layers it fetched: their lease goes
            self.source = None

    def take_over(self, timeout_s: float) -> LLMEngine | None:
        """After the ring's release: the replica's engine once built (None if the build failed,
        was stopped or took longer than ``timeout_s``)."""
        if not self._done.wait(timeout_s):
            self._timeline.mark("replica_failed", reason=f"not built within {timeout_s:.0f} s of the release")
            self.stop()
            return None
        return self.engine

    def stop(self) -> None:
        """The group ended without a release (or the worker stops): build no engine, and shut
        down one built but not handed over."""
        with self._lock:
            self._stop.set()
            engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown(drain=False, timeout=5)
            self._close_source()
