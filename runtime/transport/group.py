"""The head's executor over a pipeline group: stage 0 in this process, the other stages round
the ring, up to one micro-batch per stage in flight.

Used by the head role (hydraserve.runtime.roles) for a worker whose stage is part of a model,
and by ``hydraserve generate --pipeline-size``. ``submit(step)`` runs stage 0's layers in the
caller's thread (the engine loop), sends the step on and returns a future of the logits the
last stage sends back; while stages 1..p-1 work on it the engine computes the next micro-batch,
so with p in flight every stage stays busy (``max_inflight``). A receiver thread completes
futures in order. A stage's model failure fails that step (EngineError); a broken or garbled
ring fails every step in flight and every later one (StageTransportError) and marks the group
broken, with the reason.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from hydraserve.errors import EngineError, StageTransportError
from hydraserve.runtime.engine.runner import StageRunner, StepInput
from hydraserve.runtime.transport import frames
from hydraserve.runtime.transport.messages import ERROR, KV_EXPORT, PING, RELEASE, RESULT, seq_of, step_frame

log = logging.getLogger(__name__)


class GroupExecutor:
    """Executor of the engine (runner.Executor) for a head over ``stages`` stages."""

    def __init__(self, runner: StageRunner, outbound: socket.socket, inbound: socket.socket, stages: int, *,
                 on_broken: Callable[[str], None] | None = None) -> None:
        if not runner.model.stage.is_first:
            raise ValueError("the group executor runs on stage 0")
        self.runner = runner
        self.max_inflight = stages
        self._out, self._in = outbound, inbound
        self._send_lock = threading.Lock()
        self._pending: dict[int, Future[Any]] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.broken: str | None = None
        self._releasing = False
        self._on_broken = on_broken  # the worker turns unready with the reason
        self._receiver = threading.Thread(target=self._receive, name="group-receiver", daemon=True)
        self._receiver.start()

    def submit(self, step: StepInput) -> Future[torch.Tensor]:
        future: Future[torch.Tensor] = Future()
        activations = self.runner.run(step, None)
        seq = self._register(future)
        self._send(step_frame(seq, step, activations), seq)
        return future

    def execute(self, step: StepInput) -> torch.Tensor:
        return self.submit(step).result()

    def ping(self, timeout_s: float) -> None:
        """Return once a ping went round the whole ring (every stage serves)."""
        self._round_trip(frames.Frame(PING, {}), timeout_s, "a ping")

    def export_kv(self, slots: dict[int, int], timeout_s: float = 60.0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Keys and values of ``slots`` ({slot: cached length}) from every inner stage, in stage
        order, each [(k, v) per slot]; call with no step in flight (consolidation)."""
        pairs = sorted(slots.items())
        if not pairs:
            return [[] for _ in range(self.max_inflight - 1)]
        frame = self._round_trip(frames.Frame(KV_EXPORT, {"slots": [list(p) for p in pairs]}), timeout_s, "a KV export")
        per_stage = 2 * len(pairs)
        if len(frame.tensors) != per_stage * (self.max_inflight - 1):
            raise StageTransportError(f"KV export came back with {len(frame.tensors)} tensors, "
                                      f"expected {per_stage * (self.max_inflight - 1)}")
        return [[(frame.tensors[i + 2 * j], frame.tensors[i + 2 * j + 1]) for j in range(len(pairs))]
                for i in range(0, len(frame.tensors), per_stage)]

    def release(self, timeout_s: float = 10.0) -> None:
        """End the group: every inner stage stops serving (released, not failed); then close."""
        self._releasing = True
        try:
            self._round_trip(frames.Frame(RELEASE, {}), timeout_s, "the release")
        finally:
            self.close()

    def _round_trip(self, frame: frames.Frame, timeout_s: float, what: str) -> frames.Frame:
        future: Future[Any] = Future()
        seq = self._register(future)
        frame.fields["seq"] = seq
        self._send(frame, seq)
        try:
            result: frames.Frame = future.result(timeout_s)
        except TimeoutError:
            raise StageTransportError(f"the pipeline group did not answer {what} within {timeout_s:.0f} s") from None
        return result

    def _register(self, future: Future[Any]) -> int:
        with self._lock:
            if self.broken is not None:
                raise StageTransportError(f"the pipeline group is broken: {self.broken}")
            seq = next(self._seq)
            self._pending[seq] = future
            return seq

    def _send(self, frame: frames.Frame, seq: int) -> None:
        try:
            with self._send_lock:
                frames.send(self._out, frame)
        except (OSError, StageTransportError) as exc:
            self._break(f"sending to stage 1 failed: {exc}")
            raise StageTransportError(f"the pipeline group is broken: {self.broken}") from exc

    def _receive(self) -> None:
        try:
            while True:
                frame = frames.recv(self._in)
                if frame is None:
                    self._break("closed" if self._releasing else "the last stage closed its link")
                    return
                seq = seq_of(frame)
                with self._lock:
                    future = self._pending.pop(seq, None)
                if future is None:
                    raise StageTransportError(f"{frame.kind} frame for unknown step {seq}")
                if frame.kind == RESULT:
                    future.set_result(torch.cat(frame.tensors).float())
                elif frame.kind == ERROR:
                    future.set_exception(EngineError(str(frame.fields.get("message", "a stage failed"))))
                elif frame.kind in (PING, KV_EXPORT, RELEASE):
                    future.set_result(frame)
                else:
                    raise StageTransportError(f"unexpected {frame.kind!r} frame from the last stage")
        except (OSError, StageTransportError) as exc:
            self._break(exc.message if isinstance(exc, StageTransportError) else f"the ring broke: {exc}")

    def _break(self, reason: str) -> None:
        with self._lock:
            first = self.broken is None
            if first:
                self.broken = reason
            pending, self._pending = self._pending, {}
        if first and reason != "closed":
            log.error("pipeline group broken: %s", reason)
            if self._on_broken is not None:
                self._on_broken(reason)
        for future in pending.values():
            if not future.done():
                future.set_exception(StageTransportError(f"the pipeline group is broken: {reason}"))

    def close(self) -> None:
        """Close both links (the inner stages see the ring end and stop)."""
        self._break("closed")
        for sock in (self._out, self._in):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._receiver.join(timeout=5)
