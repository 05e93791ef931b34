"""Forward one HTTP request to a function instance and stream the answer back.

Hop-by-hop headers are dropped both ways (RFC 9110 §7.6.1); a Content-Length from the
instance is kept (so the client's connection stays alive), otherwise the body is chunked;
bodies stream as they come, so SSE tokens reach the client as they are generated. Only this
module talks to instances. An instance that cannot serve, before it sent anything (nothing
answers at its address, or it answers 503 with an instance failure), raises
InstanceFailedError so the gateway can retry the request elsewhere; one that breaks off a
stream under way ends it with an SSE error event (OpenAI's shape, which the openai client
raises as an APIError) and a clean end of the body, and the caller is told why. A client
that goes away cancels the handler: the instance's connection is closed at once, which
aborts the request in its engine. The gateway's drain ending a request (its task cancelled
with ``GATEWAY_STOPPING``) ends a stream the same way, with a retryable 503 error event, or
answers a request not yet answered with that 503. A stream whose headers the gateway already
sent (``into``: it waited for a cold start with SSE comments) gets the instance's events in it,
and an instance's error answer becomes an SSE error event there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from hydraserve.activator.embedded.usage import UsageTap
from hydraserve.errors import HydraError, InstanceFailedError, TemporaryError, error_from_response

GATEWAY_STOPPING = "the gateway is stopping"


def ended_by_drain(exc: asyncio.CancelledError) -> bool:
    """Whether the gateway's drain cancelled this request (then the cancellation is undone, so
    the request can still be answered); a client that left is not."""
    if exc.args and exc.args[0] == GATEWAY_STOPPING:
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return True
    return False


def stopping_error() -> TemporaryError:
    return TemporaryError(f"{GATEWAY_STOPPING}: send the request again", retry_after_s=1.0)


MAX_ERROR_BODY_BYTES = 64 << 10  # an instance's error answer, turned into an SSE error event
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length"}


class InstanceProxy:
    def __init__(self, timeout_s: float = 300.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:  # created on the gateway's loop, on first use
            # no header the client did not send: a body without Content-Type would get
            # application/octet-stream, and a binary CloudEvent's JSON data would be read as text
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0), auto_decompress=False,
                timeout=self._timeout, skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, base_url: str, path: str, request: web.Request, body: bytes, *,
                      on_first_byte: Callable[[], None], on_first_chunk: Callable[[], None] = lambda: None,
                      headers_out: Mapping[str, str] | None = None, into: web.StreamResponse | None = None,
                      on_usage: Callable[[int, int], None] | None = None, drop_usage_chunk: bool = False,
                      ) -> tuple[web.StreamResponse, str | None]:
        """Send ``request`` (its ``body`` already read) to ``base_url + path`` and stream the
        answer (``headers_out`` added to the instance's headers; into the SSE response ``into``
        when its headers went out already); with it, why the instance broke the answer off
        (None when it did not). A successful answer's token usage goes to ``on_usage`` (a usage
        chunk only the gateway asked for is dropped: ``drop_usage_chunk``)."""
        headers = _end_to_end(request.headers)
        url = base_url.rstrip("/") + "/" + path.lstrip("/")
        upstream = None
        for attempt in (1, 2):
            try:
                upstream = await self._client().request(request.method, url, params=request.rel_url.query,
                                                        data=body, headers=headers, allow_redirects=False)
                break
            except aiohttp.ServerTimeoutError:  # slow, not gone: the instance stays
                raise TemporaryError("function instance did not answer in time", retry_after_s=1.0) from None
            except aiohttp.ServerDisconnectedError:
                if attempt == 2:  # the first may be a kept-alive connection the instance had just closed
                    raise InstanceFailedError("function instance closed the connection", retry_after_s=1.0) from None
            except aiohttp.ClientConnectionError as exc:
                raise InstanceFailedError(f"function instance unreachable: {type(exc).__name__}",
                                          retry_after_s=1.0) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise TemporaryError(f"function instance did not answer: {type(exc).__name__}",
                                     retry_after_s=1.0) from None
            except asyncio.CancelledError as exc:
                if not ended_by_drain(exc):
                    raise
                raise stopping_error() from None
        assert upstream is not None
        try:
            if upstream.status == 503 and upstream.content_type == "application/json":
                raw = await _read_failure(upstream)
                on_first_byte()
                if into is not None:
                    return await end_with_error(into, error_from_response(503, json.loads(raw), source="function")), None
                return web.Response(status=503, body=raw, headers=_answer_headers(upstream, headers_out)), None
            on_first_byte()
            tap = UsageTap(upstream.content_type, drop_usage_chunk) if upstream.status == 200 else None
            try:
                if into is not None:
                    answered = await _relay_into(request, upstream, into, on_first_chunk, tap)
                else:
                    out = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                             headers=_answer_headers(upstream, headers_out))
                    if upstream.content_length is not None:
                        out.content_length = upstream.content_length
                    await out.prepare(request)
                    answered = await _pump(request, upstream, out, on_first_chunk, tap)
            finally:  # the tokens were spent even when the client left (or was cancelled) at the very end
                if tap is not None and tap.usage is not None and on_usage is not None:
                    on_usage(*tap.usage)
            return answered
        finally:
            upstream.close()  # no-op after a full read; after a cancel it drops the connection


def _end_to_end(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The headers meant for the other end (hop-by-hop ones dropped; repeated ones kept)."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


def _answer_headers(upstream: aiohttp.ClientResponse, extra: Mapping[str, str] | None) -> CIMultiDict[str]:
    headers = _end_to_end(upstream.headers)
    headers.update(extra or {})
    return headers


async def _relay_into(request: web.Request, upstream: aiohttp.ClientResponse, into: web.StreamResponse,
                      on_first_chunk: Callable[[], None], tap: UsageTap | None
                      ) -> tuple[web.StreamResponse, str | None]:
    """The instance's answer into a stream already under way: its events as they come, or (an
    error answer, a body that is no stream) one SSE error event."""
    if upstream.status == 200 and upstream.content_type == "text/event-stream":
        return await _pump(request, upstream, into, on_first_chunk, tap)
    try:
        raw = await upstream.content.read(MAX_ERROR_BODY_BYTES)
        body: object = json.loads(raw)
    except (ValueError, aiohttp.ClientError, TimeoutError):
        body = "the function answered with no stream"
    status = upstream.status if upstream.status >= 400 else 502
    return await end_with_error(into, error_from_response(status, body, source="function")), None


async def end_with_error(out: web.StreamResponse, error: HydraError) -> web.StreamResponse:
    """End an SSE stream with OpenAI's error event (the openai client raises it as an APIError)."""
    with contextlib.suppress(ConnectionResetError):
        await out.write(f"data: {json.dumps(error.to_openai())}\n\n".encode())
        await out.write_eof()
    return out


async def _pump(request: web.Request, upstream: aiohttp.ClientResponse, out: web.StreamResponse,
                on_first_chunk: Callable[[], None], tap: UsageTap | None = None
                ) -> tuple[web.StreamResponse, str | None]:
    """Copy the instance's body to the client as it comes (through ``tap``, which reads usage)."""
    first = True
    while True:
        try:
            chunk = await upstream.content.readany()
            if not chunk:
                break
            if first:
                on_first_chunk()
                first = False
            if tap is not None:
                chunk = tap.feed(chunk)
            if chunk:
                await out.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            broken = InstanceFailedError(f"function instance broke off the response: {type(exc).__name__}")
            await _end(request, upstream, out, broken)
            return out, broken.message
        except ConnectionResetError:  # the client went away: nothing more to send, the instance is fine
            out.force_close()
            return out, None
        except asyncio.CancelledError as exc:
            if not ended_by_drain(exc):
                raise
            await _end(request, upstream, out, stopping_error())
            return out, None
    rest = tap.end() if tap is not None else b""
    with contextlib.suppress(ConnectionResetError):
        if rest:
            await out.write(rest)
        await out.write_eof()
    return out, None


async def _end(request: web.Request, upstream: aiohttp.ClientResponse, out: web.StreamResponse,
               error: HydraError) -> None:
    """End a body before its end (the instance broke it off, or the gateway stops): an SSE stream
    with an error event and a clean end; anything else by aborting the connection (a clean end
    would pass a cut body for whole)."""
    if upstream.content_type == "text/event-stream":  # the client hears it first
        await end_with_error(out, error)
        return
    if request.transport is not None:
        request.transport.abort()


async def _read_failure(upstream: aiohttp.ClientResponse) -> bytes:
    """A JSON 503's body; raises the InstanceFailedError it carries, if it is one."""
    try:
        raw = await upstream.read()
        body = json.loads(raw)
    except (TimeoutError, ValueError, aiohttp.ClientError):
        raise TemporaryError("function instance answered 503 with an unreadable body", retry_after_s=1.0) from None
    error = error_from_response(503, body, source="function instance")
    if isinstance(error, InstanceFailedError):
        raise error
    return raw
