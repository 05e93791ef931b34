"""Serve a WSGI app with waitress and drain on SIGTERM (the Knative runtime contract).

Waitress streams SSE chunks as they are yielded (measured: 0.2 s apart in, 0.2 s apart out)
and is a production server, so Flask stays behind it (the runtime serves a few dozen requests
at once; the gateway, which parks thousands, runs on aiohttp). Reading ahead on each
connection lets a request see its client leave (``client_gone``) while it is being answered. On SIGTERM or SIGINT readiness turns
false at once, in-flight requests finish (bounded by ``drain_timeout_s``), then the engine
stops and the process exits.

Idle and stalled connections cannot freeze a service (issue 22 item 4: 100 idle sockets, waitress's
default connection limit, stopped it accepting for 300 s). A connection with no request under
way closes once silent for ``IDLE_TIMEOUT_S`` (a request line never finished, a chunk size that
never ends, plain idleness); past 90 % of ``connection_limit`` the idle ones close, least
recently active first, so the health route keeps answering; waitress polls (its select() fails
past descriptor 1023) and the process's open-file limit is raised to its hard limit.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import waitress

from hydraserve.processes import raise_open_files_limit

log = logging.getLogger(__name__)
CONNECTION_LIMIT = 2000
IDLE_TIMEOUT_S = 15


class DrainingServer:
    """A waitress server in a background thread plus a stop protocol for signals and tests."""

    def __init__(self, app: Any, host: str, port: int, *, threads: int = 32,
                 idle_timeout_s: int = IDLE_TIMEOUT_S, connection_limit: int = CONNECTION_LIMIT) -> None:
        raise_open_files_limit()  # connection_limit sockets, and files besides
        self._server = waitress.create_server(app, host=host, port=port, threads=threads, ident="hydraserve",
                                              connection_limit=connection_limit, channel_timeout=idle_timeout_s,
                                              cleanup_interval=max(1, idle_timeout_s // 5),
                                              asyncore_use_poll=True,  # select() fails past descriptor 1023
                                              channel_request_lookahead=1)  # sees a client leave mid-request
        _shed_idle_channels_when_full(self._server)
        self.port = int(self._server.effective_port)
        self.host = host
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> DrainingServer:
        self._thread.start()
        return self

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask for a drain; call from the main thread."""
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: draining", signum)
            self._stop.set()
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        return self._stop.wait(timeout)

    def close(self) -> None:
        """Stop the worker threads (running tasks finish), then close every socket from inside
        the event loop's own thread: closing them from here raced the loop's poll (EBADF)."""
        server: Any = self._server
        server.task_dispatcher.shutdown(timeout=5)

        def close_all() -> None:
            for channel in list(server._map.values()):  # idle keep-alives too: else the loop
                if channel is not server and channel is not server.trigger:  # waits for them
                    try:
                        channel.close()
                    except OSError:
                        pass
            try:
                server.close()  # the listening socket and the trigger: the loop's map is now empty
            except OSError:
                server._map.clear()

        if self._thread.is_alive():
            try:
                server.trigger.pull_trigger(close_all)
            except OSError as exc:  # the loop already closed its trigger (seen once in CI: EBADF)
                log.warning("http server trigger unusable (%s); closing sockets from the caller", exc)
            else:
                self._thread.join(timeout=5)
        if self._thread.is_alive() or server._map:  # the loop never ran or is stuck: close here
            close_all()
            self._thread.join(timeout=5)


def _shed_idle_channels_when_full(server: Any) -> None:
    """Before waitress would stop accepting (its connection limit reached), channels with no
    request under way close at once, least recently active first, down to 90 % of the limit."""
    stop_accepting_when_full = server.readable
    limit = server.adj.connection_limit
    keep = int(limit * 0.9)

    def readable() -> bool:
        if len(server._map) >= limit:  # the listener and the loop's trigger are in the map too
            channels = [c for c in list(server._map.values()) if c is not server and c is not server.trigger]
            idle = sorted((c for c in channels if not c.requests), key=lambda c: c.last_activity)
            closing = idle[:len(channels) - keep]
            for channel in closing:
                channel.handle_close()
            log.warning("%d connections open, at the limit of %d: closed %d idle ones", len(channels), limit,
                        len(closing))
        return bool(stop_accepting_when_full())

    server.readable = readable


def client_gone(environ: dict[str, Any]) -> Callable[[], bool]:
    """Whether the request's client has closed its connection (waitress tells; other servers: never)."""
    check = environ.get("waitress.client_disconnected")
    return check if callable(check) else (lambda: False)


def serve_until_signalled(server: DrainingServer, *, on_drain: Callable[[], None],
                          wait_idle: Callable[[float], bool], drain_timeout_s: float,
                          on_stop: Callable[[], None]) -> None:
    """Run a started server until a signal; then drain (readiness off, wait for in-flight), stop."""
    server.install_signal_handlers()
    while not server.wait_for_stop(1.0):
        pass
    on_drain()
    if not wait_idle(drain_timeout_s):
        log.warning("drain timed out after %.0f s; stopping with requests in flight", drain_timeout_s)
    on_stop()
    server.close()
