"""An inner stage's place in the ring of its pipeline group: frames in from the previous stage,
its layers run, frames out to the next stage (the last stage sends the logits back to the head).

Started by the inner-stage role (hydraserve.runtime.roles) once its layers are loaded. Each
worker listens on its transport address from process start (``listen``), so a peer may connect
before the model is in; frames are read only once the loop runs, so a ``ping`` returns to the
head only when every stage serves. A link carries frames only once both its ends proved they
hold the group's secret (hydraserve.runtime.transport.handshake, ``link_ring``): a connection
that does not is closed and the stage waits on for its real peer. Frames arrive in order on one
TCP link per hop, so steps reach each stage's KV cache in the order the head issued them. A failed model call becomes an
``error`` frame (the group keeps serving); a broken link or a malformed frame ends the loop
with the reason (the worker then reports itself failed): never a crash, never a guess.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from hydraserve.errors import StageTransportError
from hydraserve.runtime.engine.runner import StageRunner
from hydraserve.runtime.transport import frames, handshake
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

HANDSHAKE_TIMEOUT_S = 5.0  # an accepted connection proves the group's secret within this, or goes
MAX_PENDING = 64  # connections mid-handshake at once; past it the oldest goes (a flood runs out of nothing)
_GIVE_UP_POLL_S = 0.25  # how often an accept that may be told to give up looks


def listen(address: str) -> socket.socket:
    """A socket bound to ``host:port`` and listening (the stage's inbound link)."""
    host, _, port = address.rpartition(":")
    sock = socket.create_server((host, int(port)))
    return sock


def _ready(sock: socket.socket) -> socket.socket:
    """A proven link, set for frames: blocking, small frames sent at once."""
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _reach(address: str, deadline: float, timeout_s: float) -> socket.socket:
    """A TCP connection to ``host:port``, retried until the peer listens or the deadline."""
    host, _, port = address.rpartition(":")
    delay = 0.01
    while True:
        try:
            return socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s))
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise StageTransportError(f"stage at {address} did not accept a link within {timeout_s:.0f} s: "
                                          f"{exc}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def connect(address: str, timeout_s: float, secret: bytes) -> socket.socket:
    """A link to the next stage at ``host:port``, retried until it listens, then proven both ways
    (handshake.dial) within ``timeout_s``: its answer may wait until that stage is loaded."""
    deadline = time.monotonic() + timeout_s
    sock = _reach(address, deadline, timeout_s)
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        handshake.dial(sock, secret, address)
    except TimeoutError:
        sock.close()
        raise StageTransportError(f"stage at {address} did not answer the link handshake within "
                                  f"{timeout_s:.0f} s") from None
    except OSError as exc:
        sock.close()
        raise StageTransportError(f"the link to the stage at {address} broke in its handshake: {exc}") from exc
    except StageTransportError:
        sock.close()
        raise
    return _ready(sock)


class _Doorman:
    """Answers the connections to a stage's listener side by side until one proves the group's
    secret; refuses (closes and logs) the rest, the silent ones at their handshake deadline."""

    def __init__(self, listener: socket.socket, secret: bytes, handshake_s: float,
                 selector: selectors.BaseSelector) -> None:
        self._listener = listener
        self._secret = secret
        self._handshake_s = handshake_s
        self._selector = selector
        self._pending: dict[socket.socket, tuple[str, handshake.Answer]] = {}
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, data=None)

    def next_deadline(self, default: float) -> float:
        return min([default, *(answer.deadline for _, answer in self._pending.values())])

    def wait(self, timeout_s: float) -> socket.socket | None:
        """The proven link, if one came within ``timeout_s``."""
        for key, _ in self._selector.select(max(timeout_s, 0.0)):
            if key.data is None:
                self._admit()
            elif self._advance(key.data):
                return key.data
        self._drop_overdue()
        return None

    def _admit(self) -> None:
        try:
            sock, address = self._listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        if len(self._pending) >= MAX_PENDING:  # the real peer proves itself as soon as it is taken in
            self._refuse(next(iter(self._pending)), f"the oldest of {MAX_PENDING} connections mid-handshake")
        sock.setblocking(False)
        self._pending[sock] = (f"{address[0]}:{address[1]}",
                               handshake.Answer(sock, self._secret, time.monotonic() + self._handshake_s))
        self._selector.register(sock, selectors.EVENT_READ, data=sock)

    def _advance(self, sock: socket.socket) -> bool:
        peer, answer = self._pending[sock]
        try:
            done = answer.feed()
        except BlockingIOError:  # woken with nothing to read after all
            return False
        except (handshake.Refused, OSError) as exc:
            self._refuse(sock, str(exc) or type(exc).__name__)
            return False
        if done:
            self._selector.unregister(sock)
            del self._pending[sock]
            log.info("stage link from %s proved the group's secret", peer)
        return done

    def _drop_overdue(self) -> None:
        now = time.monotonic()
        for sock in [s for s, (_, answer) in self._pending.items() if answer.deadline <= now]:
            self._refuse(sock, f"no handshake within {self._handshake_s:g} s")

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        peer, _ = self._pending.pop(sock)
        self._selector.unregister(sock)
        sock.close()
        log.warning("refused a stage link from %s: %s", peer, reason)

    def close(self) -> None:
        """Connections still mid-handshake are refused too; the listener stays open (its owner's)."""
        for sock in list(self._pending):
            self._refuse(sock, "still in its handshake when this stage stopped accepting")
        self._selector.unregister(self._listener)


def accept(listener: socket.socket, timeout_s: float, secret: bytes, *,
           handshake_s: float = HANDSHAKE_TIMEOUT_S, give_up: threading.Event | None = None) -> socket.socket:
    """The previous stage's link: the first connection that proves it holds the group's secret
    (handshake.Answer). Any other (a wrong secret, anything but the handshake, silence past
    ``handshake_s``) is closed and logged, and the wait goes on: connecting first wins nothing.
    ``give_up`` set: stop waiting (this stage's own dial failed)."""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        doorman = _Doorman(listener, secret, handshake_s, selector)
        try:
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise StageTransportError(f"no stage linked to this one within {timeout_s:.0f} s")
                if give_up is not None and give_up.is_set():
                    raise StageTransportError("stopped waiting for the previous stage's link")
                wait_s = doorman.next_deadline(deadline) - now
                linked = doorman.wait(min(wait_s, _GIVE_UP_POLL_S) if give_up is not None else wait_s)
                if linked is not None:
                    return _ready(linked)
        finally:
            doorman.close()


def _close_link(dialed: Future[socket.socket]) -> None:
    if dialed.exception() is None:
        dialed.result().close()


def link_ring(listener: socket.socket, next_address: str, secret: bytes,
              timeout_s: float) -> tuple[socket.socket, socket.socket]:
    """This stage's two links, (to the next stage, from the previous one), both proven. Dialed
    and accepted at once: every stage dials before it accepts and a dial's handshake waits for
    the next stage's accept, so one after the other the ring would wait on itself."""
    dialed: Future[socket.socket] = Future()
    give_up = threading.Event()

    def dial() -> None:
        try:
            dialed.set_result(connect(next_address, timeout_s, secret))
        except BaseException as exc:
            dialed.set_exception(exc)
            give_up.set()

    threading.Thread(target=dial, name="stage-dial", daemon=True).start()
    try:
        inbound = accept(listener, timeout_s, secret, give_up=give_up)
    except BaseException:
        dialed.add_done_callback(_close_link)
        if give_up.is_set():
            dialed.result()  # the dial's own reason
        raise
    try:
        return dialed.result(), inbound
    except BaseException:
        inbound.close()
        raise


class StageLink:
    """Serves one inner stage: ``run()`` returns when the ring closes (normally or not)."""

    def __init__(self, runner: StageRunner, listener: socket.socket, next_address: str, *, secret: bytes,
                 link_timeout_s: float = 180.0, on_frame: Callable[[str], None] | None = None) -> None:
        self.runner = runner
        self._listener = listener
        self._next_address = next_address
        self._secret = secret  # the group's: both links are proven with it
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
            self._outbound, self._inbound = link_ring(self._listener, self._next_address, self._secret,
                                                      self._timeout_s)
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
