"""Serve an aiohttp app from its own event loop in a background thread, and drain on close.

For the gateway, which parks thousands of connections (waitress spends a thread on each
request, Flask is synchronous; see README "Why the gateway is not Flask"). A client that goes
away cancels its handler (``handler_cancellation``), so its request stops upstream too. On
``close`` the listener stops at once, requests in flight get ``drain_timeout_s`` to finish,
then the app's cleanup runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from aiohttp import web

log = logging.getLogger(__name__)

T = TypeVar("T")


class BackgroundAioServer:
    def __init__(self, app: web.Application, host: str, port: int, *, drain_timeout_s: float = 30.0,
                 backlog: int = 4096) -> None:
        self.host = host
        self._app = app
        self._port = port
        self._drain_timeout_s = drain_timeout_s
        self._backlog = backlog
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="aio-http", daemon=True)
        self._runner: web.AppRunner | None = None
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
                               shutdown_timeout=self._drain_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port, backlog=self._backlog, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server: Any = site._server  # an asyncio.Server: the port bound for port 0
        if server is not None and server.sockets:
            self.port = int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening, give requests in flight the drain time, run the app's cleanup, stop."""
        if self._runner is not None and self._loop.is_running():
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
