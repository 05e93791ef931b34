"""Serve an aiohttp app from its own event loop in a background thread, and drain on close.

For the gateway, which parks thousands of connections (waitress spends a thread on each
request, Flask is synchronous; see README "Why the gateway is not Flask"). A client that goes
away cancels its handler (``handler_cancellation``), so its request stops upstream too. On
``close`` the listener stops at once, requests in flight get ``drain_timeout_s`` to finish,
then the app's cleanup runs on the loop.

Idle connections cannot exhaust it (issue 22 item 5: 20,000 idle sockets took every descriptor,
/healthz timed out and a failed accept was logged 232 MB a half-minute): one with no request
under way closes after ``idle_timeout_s`` (aiohttp's default is an hour), and past
``max_connections`` (half the open-file limit: the rest is for upstream connections) the idle
ones close at once, oldest first. A failed accept is logged once a minute at most.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from aiohttp import web

from hydraserve.processes import raise_open_files_limit

log = logging.getLogger(__name__)

T = TypeVar("T")
IDLE_TIMEOUT_S = 15.0
SHED_EVERY_S = 0.2


class _OncePerInterval(logging.Filter):
    """Passes one record of a kind per ``interval_s`` (asyncio logs a failed accept every time)."""

    def __init__(self, prefix: str, interval_s: float) -> None:
        super().__init__()
        self._prefix, self._interval_s, self._last = prefix, interval_s, -interval_s

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self._prefix):
            return True
        if record.created - self._last < self._interval_s:
            return False
        self._last = record.created
        return True


_accept_failures = _OncePerInterval("socket.accept() out of system resource", 60.0)


class BackgroundAioServer:
    def __init__(self, app: web.Application, host: str, port: int, *, drain_timeout_s: float = 30.0,
                 backlog: int = 4096, idle_timeout_s: float = IDLE_TIMEOUT_S, max_connections: int | None = None
                 ) -> None:
        self.host = host
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections or max(64, raise_open_files_limit() // 2)
        if _accept_failures not in logging.getLogger("asyncio").filters:
            logging.getLogger("asyncio").addFilter(_accept_failures)
        self._app = app
        self._port = port
        self._drain_timeout_s = drain_timeout_s
        self._backlog = backlog
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="aio-http", daemon=True)
        self._runner: web.AppRunner | None = None
        self._shedder: asyncio.Task[None] | None = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run ``coro`` on the server's loop from another thread and return its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def start(self) -> BackgroundAioServer:
        """Bind (raises OSError when the port is taken) and serve."""
        self._thread.start()
        try:
            self.call(self._start())
        except BaseException:
            self._stop_loop()
            raise
        return self

    async def _start(self) -> None:
        runner = web.AppRunner(self._app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self._drain_timeout_s, keepalive_timeout=self._idle_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port, backlog=self._backlog, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._shedder = asyncio.get_running_loop().create_task(self._shed_idle_connections(runner))
        server: Any = site._server  # an asyncio.Server: the port bound for port 0
        if server is not None and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])

    async def _shed_idle_connections(self, runner: web.AppRunner) -> None:
        """Past ``max_connections``, idle connections close, oldest first, down to 90 % of it."""
        while True:
            await asyncio.sleep(SHED_EVERY_S)
            handlers = runner.server.connections if runner.server is not None else []
            excess = len(handlers) - self._max_connections
            if excess <= 0:
                continue
            idle = [h for h in handlers if not getattr(h, "_request_in_progress", False)]  # aiohttp's own flag
            closing = idle[:excess + self._max_connections // 10]
            for handler in closing:
                handler.force_close()
            log.warning("%d connections open, over the limit of %d: closed %d idle ones", len(handlers),
                        self._max_connections, len(closing))

    def close(self) -> None:
        """Stop listening, give requests in flight the drain time, run the app's cleanup, stop."""
        if self._runner is not None and self._loop.is_running():
            if self._shedder is not None:
                self._loop.call_soon_threadsafe(self._shedder.cancel)
            try:
                self.call(self._runner.cleanup(), timeout=self._drain_timeout_s + 60)
            except Exception as exc:
                log.warning("http server cleanup failed: %s", exc)
            self._runner = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()
