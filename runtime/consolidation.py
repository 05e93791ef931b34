"""Consolidation: a full head grows into the whole model and takes its group's sequences over.

Started by the head role of a pipeline group whose worker was given memory for the whole model
(``full``). In order, each step on the timeline:
1. once the group has served a request, the layers the head lacks are fetched through its files
   (loaderd: at background priority, behind any cold start's bytes) and the whole model is built
   reusing stage 0's tensors (``grow_stage``), and its KV cache allocated: all outside the
   engine's step lock, so decoding goes on meanwhile;
2. the running sequences' KV moves to the whole model, one of two ways (``handover``):
   ``recompute`` (the default): still outside the lock, the whole model prefills every running
   sequence's tokens so far into its own KV cache; then under the step lock, with no step in
   flight (``engine.reconfigure``), only the tokens decoded meanwhile are prefilled (a few per
   sequence, and whole sequences that started since). ``migrate``: under the lock, one
   ``kv_export`` round trip brings every inner stage's keys and values of the running sequences
   beside stage 0's own. Either way the executor becomes the whole model and no request is
   restarted: each continues from the position it had reached;
3. the ring is released (the inner stages stop serving, not failed) and ``on_done`` tells the
   worker, whose status says ``consolidated`` (its launcher then stops the partial workers and
   the placement service frees their memory).
Any failure before the switch leaves the group serving as it was (logged, on the timeline).

Why recompute by default: measured by ``hydraserve bench pipeline`` on the emulated cluster
(50 Mbit/s links), moving 323 tokens' KV of 7 of 10 layers took 1.93 s under the lock (the
inner stages' KV crosses the head's capped link) while a prefill of those tokens took 0.19 s,
and done ahead, outside the lock, it leaves only the few tokens decoded meanwhile to the
stall. Migration wins where links are fast against compute (a GPU group on 16+ Gbps: KV of a
13B model is ~0.8 MB a token) and stays selectable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from hydraserve.contracts.stage import StageSpec
from hydraserve.contracts.timeline import Timeline
from hydraserve.runtime.engine.engine import LLMEngine
from hydraserve.runtime.engine.runner import Executor, ModelRunner, StepInput
from hydraserve.runtime.model.layers import StageModel
from hydraserve.runtime.model.loader import grow_stage
from hydraserve.runtime.transport.group import GroupExecutor
from hydraserve.weights.model_files import ModelFiles
from hydraserve.weights.source import TensorSource

log = logging.getLogger(__name__)

KVHandover = Literal["recompute", "migrate"]
PREFILL_CHUNK = 256  # tokens per forward call of a recompute


def _prefill(runner: ModelRunner, slot: int, tokens: list[int], start: int) -> None:
    """KV of ``tokens[start:]`` into ``runner``'s cache at their positions (logits unused)."""
    for i in range(start, len(tokens), PREFILL_CHUNK):
        runner.execute(StepInput(prefill_tokens=[tokens[i:i + PREFILL_CHUNK]], prefill_slots=[slot],
                                 prefill_starts=[i]))


def grow_to_whole(model: StageModel, files: ModelFiles, timeline: Timeline) -> tuple[StageModel, TensorSource]:
    """The whole model around ``model``'s stage: the layers it lacks fetched through ``files`` at
    background priority (behind any cold start's bytes), its own tensors reused. Returns the
    source too: keep it open while the model is used (its tensors may be views of loaderd's
    memory)."""
    whole = StageSpec.whole(model.stage.num_layers)
    held = set(files.stage_tensor_names(model.stage))
    missing = [n for n in files.stage_tensor_names(whole) if n not in held]
    timeline.mark("consolidation_fetch_started", tensors=len(missing))
    source = files.tensor_source(missing, background=True)
    try:
        grown = grow_stage(model, source, whole, checkpoint_names=files.tensor_index())
    except BaseException:
        source.close()
        raise
    timeline.mark("consolidation_loaded")
    return grown, source


class Consolidator:
    """Runs steps 1-3 above in its own thread (``start``); ``done`` is set when it ended."""

    def __init__(self, engine: LLMEngine, group: GroupExecutor, files: ModelFiles, timeline: Timeline, *,
                 on_done: Callable[[], None], handover: KVHandover = "recompute", poll_s: float = 0.05) -> None:
        self._engine = engine
        self._group = group
        self._files = files
        self._timeline = timeline
        self._on_done = on_done
        self.handover = handover
        self._poll_s = poll_s
        self._start_steps = engine.steps  # the warm-up's
        self._stop = threading.Event()
        self.done = threading.Event()
        self.consolidated = False
        self.migrated = 0  # sequences whose KV went to the whole model (moved or recomputed)
        self._ahead: dict[int, tuple[str, list[int]]] = {}  # slot -> what recompute-ahead covered
        self.failed: str | None = None
        self.source: TensorSource | None = None  # the missing layers' bytes (kept open: views of loaderd's memory)
        self._thread = threading.Thread(target=self._run, name="consolidation", daemon=True)

    def start(self) -> Consolidator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            while self._engine.steps <= self._start_steps:  # wait for the group's first request
                if self._stop.wait(self._poll_s):
                    return
            whole = self._grow()
            head = self._group.runner
            runner = ModelRunner(whole, head.kv.num_slots, head.kv.max_len)  # its zeroed KV: not under the lock
            if self.handover == "recompute":
                ahead = time.monotonic()
                self._ahead = self._engine.contexts()
                for slot, (_, tokens) in self._ahead.items():
                    _prefill(runner, slot, tokens, 0)
                self._timeline.mark("kv_recomputed", sequences=len(self._ahead),
                                    tokens=sum(len(t) for _, t in self._ahead.values()),
                                    seconds=round(time.monotonic() - ahead, 4))
            if self._stop.is_set():
                return
            started = time.monotonic()
            switch = self._recompute_rest if self.handover == "recompute" else self._migrate
            self._engine.reconfigure(lambda old, cached: switch(runner, cached))
            self._timeline.mark("consolidated", switch_s=round(time.monotonic() - started, 4),
                                migrated=self.migrated, handover=self.handover)
            self.consolidated = True
            try:
                self._group.release()
            except Exception as exc:  # the whole model serves already: a failed release is only logged
                log.warning("releasing the group after consolidation failed: %s", exc)
            self._on_done()
        except Exception as exc:  # the group keeps serving
            self.failed = f"{type(exc).__name__}: {exc}"
            log.exception("consolidation failed; the group keeps serving")
            self._timeline.mark("consolidation_failed", reason=self.failed)
        finally:
            self.done.set()

    def _grow(self) -> StageModel:
        grown, self.source = grow_to_whole(self._group.runner.model, self._files, self._timeline)
        return grown

    def _recompute_rest(self, runner: ModelRunner, cached: dict[int, int]) -> Executor:
        """Under the step lock: prefill what recompute-ahead did not cover (tokens decoded since,
        sequences that started since or whose slot changed hands)."""
        now = self._engine.contexts()
        for slot, length in cached.items():
            request_id, tokens = now[slot]
            assert len(tokens) == length, (slot, len(tokens), length)
            before = self._ahead.get(slot)
            start = len(before[1]) if before and before[0] == request_id and tokens[:len(before[1])] == before[1] else 0
            _prefill(runner, slot, tokens, start)
        self.migrated = len(cached)
        return runner

    def _migrate(self, runner: ModelRunner, cached: dict[int, int]) -> Executor:
        """Under the step lock: the whole model with every running sequence's KV in place."""
        head = self._group.runner
        whole = runner.model
        for slot, length in cached.items():
            runner.kv.import_slot(slot, *head.kv.export_slot(slot, length))
        layer = head.model.stage.layer_end
        for stage_kv in self._group.export_kv(cached):
            layers = 0
            for slot, (k, v) in zip(sorted(cached), stage_kv, strict=True):
                runner.kv.import_slot(slot, k, v, first_layer=layer)
                layers = k.shape[0]
            layer += layers
        if cached and layer != whole.stage.num_layers:
            raise RuntimeError(f"the group's KV covers layers up to {layer} of {whole.stage.num_layers}")
        self.migrated = len(cached)
        return runner
