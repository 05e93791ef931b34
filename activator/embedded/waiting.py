"""What a request that waits for an instance is told while it waits, and after.

Every answer says whether the request met a cold start and how long it waited (headers). A
streamed OpenAI request that must wait gets its SSE response headers at once, then a comment
line every ``TICK_S`` (SSE comments: clients skip them; proxies see bytes, so they keep the
connection) saying how the cold start is going: its plan, the bytes loaderd has fetched, the
workers ready. The instance's events follow in the same response; a failure before them ends
it with an SSE error event (the status line went out already).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from hydraserve.contracts.timeline import Moment, Timeline
from hydraserve.contracts.worker import OPENAI_ROUTES

COLD_START_HEADER = "X-HydraServe-Cold-Start"  # "true": it arrived while no instance was ready
QUEUE_SECONDS_HEADER = "X-HydraServe-Queue-Seconds"  # how long it waited for an instance
TICK_S = 1.0
GENERATION_ROUTES = frozenset(r for r in OPENAI_ROUTES if r[1] in ("/v1/completions", "/v1/chat/completions"))


def streamed_request(method: str, path: str, body: bytes) -> dict[str, Any] | None:
    """The body of an OpenAI generation request asking for a stream (``"stream": true``), parsed
    once per request (the wait and the usage both read it); None for any other request."""
    if (method, path) not in GENERATION_ROUTES:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("stream") is True else None


def waited_headers(cold: bool, waited_s: float) -> dict[str, str]:
    return {COLD_START_HEADER: "true" if cold else "false", QUEUE_SECONDS_HEADER: f"{waited_s:.3f}"}


def progress_text(timeline: Timeline | None, now: float | None = None) -> str:
    """One line on the cold start under way: seconds so far, its plan, bytes fetched, workers ready."""
    if timeline is None or not timeline.events:
        return "waiting for a free instance (no cold start under way: every instance is busy)"
    parts = [f"cold start {(now or time.time()) - timeline.events[0].at:.1f} s"]
    plan = timeline.first(Moment.PLAN_DECIDED)
    if plan is not None:
        nodes = plan.detail.get("nodes")
        parts.append(f"planned: {plan.detail.get('pipeline_size')} stage(s) on "
                     f"{', '.join(map(str, nodes)) if isinstance(nodes, list) else nodes}")
    progress = timeline.current_progress
    total = sum(v for k, v in progress.items() if k.startswith("fetch_bytes."))
    if total:
        fetched = sum(v for k, v in progress.items() if k.startswith("fetched_bytes."))
        parts.append(f"weights {fetched / 1e6:.1f}/{total / 1e6:.1f} MB fetched")
    if "workers" in progress:
        parts.append(f"workers {progress.get('workers_ready', 0):.0f}/{progress['workers']:.0f} ready")
    return "; ".join(parts)


class EarlyStream:
    """The SSE response of a streamed request that waits: headers now, progress comments until
    ``stop``; then the instance's events go into ``response``."""

    def __init__(self, response: web.StreamResponse, progress: Callable[[], str]) -> None:
        self.response = response
        self._progress = progress
        self._ticker: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, request: web.Request, progress: Callable[[], str], cold: bool) -> EarlyStream:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               COLD_START_HEADER: "true" if cold else "false"})
        await response.prepare(request)
        stream = cls(response, progress)
        stream._ticker = asyncio.get_running_loop().create_task(stream._tick())
        return stream

    async def comment(self, text: str) -> None:
        """One SSE comment line (a client that left is the handler's to notice)."""
        with contextlib.suppress(ConnectionResetError):
            await self.response.write(f": {text.replace(chr(10), ' ')}\n\n".encode())

    async def _tick(self) -> None:
        """At once (the request's own wait has begun by the time this runs), then every tick."""
        while True:
            await self.comment(self._progress())
            await asyncio.sleep(TICK_S)

    def cancel(self) -> None:
        """No more progress comments."""
        if self._ticker is not None:
            self._ticker.cancel()

    async def stop(self, waited_s: float) -> None:
        """The wait is over: no more progress; say how long it took."""
        self.cancel()
        await self.comment(f"waited {waited_s:.3f} s for an instance")
