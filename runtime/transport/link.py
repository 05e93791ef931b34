"""An inner stage's place in the ring of its pipeline group: frames in from the previous stage,
its layers run, frames out to the next stage (the last stage sends the logits back to the head).

Started by the inner-stage role (hydraserve.runtime.roles) once its layers are loaded. Each
worker listens on its transport address from process start (``listen``), so a peer may connect
before the model is in; frames are read only once the loop runs, so a ``ping`` returns to the
head only when every stage serves. Frames arrive in order on one TCP link per hop, so steps
reach each stage's KV cache in the order the head issued them. A failed model call becomes an
``error`` frame (the group keeps serving); a broken link or a malformed frame ends the loop
with the reason (the worker then reports itself failed): never a crash, never a guess.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from hydraserve.errors import StageTransportError
from hydraserve.runtime.engine.runner import StageRunner
from hydraserve.runtime.transport import frames
from hydraserve.runtime.transport.messages import (
    ERROR,
    KV_EXPORT,
    PING,
    RELEASE,
    RESULT,
    STEP,
    kv_request_of,
    seq_of,
    step_of,
)

log = logging.getLogger(__name__)


def listen(address: str) -> socket.socket:
    """A socket bound to ``host:port`` and listening (the stage's inbound link)."""
    host, _, port = address.rpartition(":")
    sock = socket.create_server((host, int(port)))
    return sock


def connect(address: str, timeout_s: float) -> socket.socket:
    """A link to ``host:port``, retried until the peer listens or ``timeout_s`` passed."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s))
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise StageTransportError(f"stage at {address} did not accept a link within {timeout_s:.0f} s: "
                                          f"{exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
            continue
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def accept(listener: socket.socket, timeout_s: float) -> socket.socket:
    """The previous stage's link (the first connection to arrive)."""
    listener.settimeout(timeout_s)
    try:
        sock, _ = listener.accept()
    except TimeoutError:
        raise StageTransportError(f"no stage linked to this one within {timeout_s:.0f} s") from None
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class StageLink:
    """Serves one inner stage: ``run()`` returns when the ring closes (normally or not)."""

    def __init__(self, runner: StageRunner, listener: socket.socket, next_address: str, *,
                 link_timeout_s: float = 180.0, on_frame: Callable[[str], None] | None = None) -> None:
        self.runner = runner
        self._listener = listener
        self._next_address = next_address
        self._timeout_s = link_timeout_s
        self._on_frame = on_frame
        self.failed: str | None = None
        self.released = False  # the head ended the group (consolidated): not a failure
        self.steps = 0
        self._inbound: socket.socket | None = None
        self._outbound: socket.socket | None = None

    def run(self) -> None:
        model = self.runner.model
        last = model.stage.is_last
        num_slots, max_len = self.runner.kv.num_slots, self.runner.kv.max_len
        try:
            self._outbound = connect(self._next_address, self._timeout_s)
            self._inbound = accept(self._listener, self._timeout_s)
            while True:
                frame = frames.recv(self._inbound)
                if frame is None:
                    log.info("stage link closed by the previous stage", extra={"steps": self.steps})
                    return
                if self._on_frame is not None:
                    self._on_frame(frame.kind)
                if frame.kind in (PING, ERROR):
                    frames.send(self._outbound, frame)
                    continue
                if frame.kind == RELEASE:
                    frames.send(self._outbound, frame)
                    self.released = True
                    log.info("released by the head", extra={"steps": self.steps})
                    return
                if frame.kind == KV_EXPORT:  # consolidation: this stage's keys and values join the frame
                    for slot, length in kv_request_of(frame, num_slots=num_slots, max_len=max_len):
                        frame.tensors.extend(self.runner.kv.export_slot(slot, length))
                    frames.send(self._outbound, frame)
                    continue
                if frame.kind != STEP:
                    raise StageTransportError(f"unexpected {frame.kind!r} frame on a stage link")
                seq = seq_of(frame)
                step = step_of(frame, num_slots=num_slots, max_len=max_len, hidden_size=model.config.hidden_size)
                try:
                    outputs = self.runner.run(step, [x.to(self.runner.dtype) for x in frame.tensors])
                except Exception as exc:  # a model failure fails this step only
                    log.exception("stage step failed", extra={"seq": seq})
                    frames.send(self._outbound, frames.Frame(ERROR, {"seq": seq, "message": f"stage "
                                                                     f"{model.stage.index}: {exc}"}))
                    continue
                self.steps += 1
                if last:
                    frames.send(self._outbound, frames.Frame(RESULT, {"seq": seq}, outputs))
                else:
                    frames.send(self._outbound, frames.Frame(STEP, {**frame.fields, "seq": seq}, outputs))
        except (StageTransportError, OSError) as exc:
            self.failed = exc.message if isinstance(exc, StageTransportError) else f"stage link broke: {exc}"
            log.error("stage link failed: %s", self.failed)
        finally:
            self.close()

    def close(self) -> None:
        for sock in (self._inbound, self._outbound, self._listener):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
