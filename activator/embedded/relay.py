"""One request relayed to an instance of its function: parked through a cold start (a stream
is told how the start goes while it waits), sent again to a fresh instance when its instance
failed before answering (it had no token yet), and timed (queue wait, first token).

Called by the gateway's routes (activator/embedded/gateway.py) once they know the function; a
stream that fails after its headers went out ends with an error event instead of an error
status, which can no longer be sent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from hydraserve.activator.embedded.proxy import end_with_error, ended_by_drain, stopping_error
from hydraserve.activator.embedded.scaler import FunctionScaler
from hydraserve.activator.embedded.usage import ask_for_usage
from hydraserve.activator.embedded.waiting import EarlyStream, progress_text, streamed_request, waited_headers
from hydraserve.errors import HydraError, InstanceFailedError

if TYPE_CHECKING:
    from hydraserve.activator.embedded.gateway import Gateway

log = logging.getLogger(__name__)

MAX_INSTANCE_RETRIES = 2  # a request is sent to at most three instances


async def relay(gateway: Gateway, request: web.Request, scaler: FunctionScaler, name: str, path: str,
                body: bytes) -> web.StreamResponse:
    """The instance's answer to ``request`` (``body`` already read), relayed as it streams."""
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    cold = not scaler.instances  # it meets a cold start (or waits behind one)
    early: EarlyStream | None = None
    stream = streamed_request(request.method, path, body)
    if scaler.must_wait() and stream is not None:
        early = await EarlyStream.open(request, lambda: progress_text(scaler.last_timeline if scaler.starting
                                                                      else None), cold)
    try:
        return await _to_an_instance(gateway, request, scaler, name, path, ask_for_usage(body, stream), arrived,
                                     cold, early)
    except HydraError as exc:
        if early is None:
            raise
        log.warning("request to %s failed after its stream began: %s", name, exc.message)
        await early.stop(loop.time() - arrived)
        return await end_with_error(early.response, exc)
    finally:
        if early is not None:
            early.cancel()  # the client left, or the gateway stops: no more progress


async def _to_an_instance(gateway: Gateway, request: web.Request, scaler: FunctionScaler, name: str, path: str,
                          sent: tuple[bytes, bool], arrived: float, cold: bool, early: EarlyStream | None
                          ) -> web.StreamResponse:
    """Acquire an instance (waiting if need be) and forward; another one if it failed first."""
    loop = asyncio.get_running_loop()
    body, drop_usage_chunk = sent  # the body to send, and whether the usage chunk is the gateway's

    def first_token() -> None:
        gateway.metrics.time_to_first_token_seconds.labels(name).observe(loop.time() - arrived)

    for attempt in range(MAX_INSTANCE_RETRIES + 1):
        try:
            instance = await scaler.acquire()
        except asyncio.CancelledError as exc:
            if not ended_by_drain(exc):
                raise
            raise stopping_error() from None
        waited_s = loop.time() - arrived
        if attempt == 0:
            gateway.metrics.queue_wait_seconds.labels(name).observe(waited_s)
        if early is not None:
            await early.stop(waited_s)
        try:
            response, broken = await gateway.proxy.forward(
                instance.endpoint.url, path, request, body,
                on_first_byte=functools.partial(scaler.first_response, instance), on_first_chunk=first_token,
                headers_out=waited_headers(cold, waited_s), into=early.response if early else None,
                on_usage=scaler.usage.tokens, drop_usage_chunk=drop_usage_chunk)
        except InstanceFailedError as exc:
            scaler.instance_failed(instance, exc.message)  # dropped before its slot frees
            scaler.release(instance)
            if attempt == MAX_INSTANCE_RETRIES:
                raise
            gateway.metrics.retries.labels(name).inc()
            log.warning("request to %s sent again after its instance failed: %s", name, exc.message)
            continue
        except BaseException:
            scaler.release(instance)
            raise
        if broken is not None:
            scaler.instance_failed(instance, broken)
        scaler.release(instance)
        return response
    raise AssertionError("unreachable")
