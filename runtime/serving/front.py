"""The worker's HTTP front: our routes, then vLLM's OpenAI server behind one strict door.

An ASGI app (served by uvicorn; hydraserve.runtime.serving.worker), assembled here in one place:
- ours: ``GET /livez`` (200 while the serving loop answers: the liveness its launcher and the
  kubelet probe), ``GET /healthz`` (true while the process can serve or is still starting), ``GET /readyz``
  (true once vLLM serves and no drain is under way; its body is the WorkerStatus contract),
  ``GET /metrics`` (ours and vLLM's), ``GET /v1/hydraserve/timeline``, and CloudEvents on
  ``POST /`` (hydraserve.http_events; each event becomes one OpenAI request below);
- vLLM's, once it serves (earlier requests wait, bounded): ``POST /v1/completions``,
  ``POST /v1/chat/completions``, ``GET /v1/models``, ``POST /tokenize``, ``POST /detokenize``.
  Every other route of vLLM's server is closed. Bodies are checked before vLLM sees them: JSON
  (415 otherwise), at most 1 MiB (413), numbers that parse (a 4,301-digit integer is a 400, not
  vLLM's 500), and only parameters vLLM's request model has, less those a function does not
  take (engine internals, multimodal inputs, request ids): anything else is a 400 naming it,
  never silently ignored. Responses carry ``token_ids`` (vLLM's ``return_token_ids``) unless a
  request says otherwise. vLLM's JSON errors are rewritten to our shape (hydraserve.errors:
  OpenAI's plus ``retryable``), so the gateway and every client read them as one class.
A pipeline stage that is not the head (``api=False``) serves only the first group of routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from hydraserve import http_events as events
from hydraserve.contracts import events as event_types
from hydraserve.contracts.worker import FUNCTION_ROUTES
from hydraserve.errors import (
    ContextLengthError,
    EngineError,
    HydraError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    class_for_status,
    error_from_response,
)
from hydraserve.http_json import decode_json
from hydraserve.runtime.serving.state import ServingState

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
# Parameters vLLM's request models have that a function does not take: engine internals
# (disaggregated serving, routing, scheduling), multimodal inputs (text models), tensors sent as
# bytes, and request ids a client could collide with another's.
NOT_TAKEN = frozenset({"prompt_embeds", "kv_transfer_params", "ec_transfer_params", "mm_payload", "return_mm_kwargs",
                       "media_io_kwargs", "mm_processor_kwargs", "request_id", "priority", "vllm_xargs",
                       "routed_experts_prompt_start", "session_id"})


def accepted_parameters() -> dict[str, frozenset[str]]:
    """Route -> the body parameters it takes: vLLM's request model's fields, less NOT_TAKEN."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"/v1/completions": frozenset(CompletionRequest.model_fields) - NOT_TAKEN,
            "/v1/chat/completions": frozenset(ChatCompletionRequest.model_fields) - NOT_TAKEN}


class FrontMetrics:
    """Our series (own registry, so tests can build many fronts); vLLM's are in the default one."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hydraserve_runtime_requests_total", "Requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("hydraserve_runtime_request_seconds", "Request latency to the last byte",
                                 ["route"], registry=self.registry)
        self.inflight = Gauge("hydraserve_runtime_inflight_requests", "Requests in flight", registry=self.registry)
        self.client_gone = Counter("hydraserve_runtime_client_gone_total",
                                   "Requests whose client left before their end (vLLM aborts them)",
                                   registry=self.registry)
        self.startup_phase = Gauge("hydraserve_runtime_startup_seconds",
                                   "Seconds from process start to each start-up phase", ["phase"],
                                   registry=self.registry)


class Front:
    """The ASGI app of one worker (see the module docstring)."""

    def __init__(self, state: ServingState[Any], *, metrics: FrontMetrics | None = None, api: bool = True,
                 ready_wait_s: float = 120.0, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.state = state
        self.metrics = metrics or FrontMetrics()
        self.api = api
        self.ready_wait_s = ready_wait_s
        self.max_body_bytes = max_body_bytes
        self._parameters: dict[str, frozenset[str]] | None = None  # read of vLLM once it is imported

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        own = {("GET", "/livez"): self._livez, ("GET", "/healthz"): self._healthz, ("GET", "/readyz"): self._readyz,
               ("GET", "/metrics"): self._metrics, ("GET", "/v1/hydraserve/timeline"): self._timeline}
        if (method, path) in own:
            try:
                await own[(method, path)](send)
            except Exception:
                log.exception("%s %s failed", method, path)
                await _send_error(send, HydraError("internal error"))
            return
        route = path if self.api and (method, path) in FUNCTION_ROUTES else "unmatched"
        started = time.monotonic()
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.state.enter()
        self.metrics.inflight.inc()
        try:
            if route == "unmatched":
                raise NotFoundError(f"no route {method} {path}")
            if path == "/":
                await self._cloudevent(scope, receive, counted)
            else:
                await self._to_vllm(scope, receive, counted)
        except HydraError as exc:
            await _send_error(counted, exc)
        except Exception:
            log.exception("request %s %s failed", method, path)
            await _send_error(counted, HydraError("internal error"))
        finally:
            self.state.leave()
            self.metrics.inflight.dec()
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)

    # our routes ---------------------------------------------------------------------------
    async def _livez(self, send: Send) -> None:
        """200 whenever the serving loop answers, failed or not (liveness: a deadlocked worker does
        not answer; a failed one does, and says why on /healthz)."""
        await _send_json(send, 200, {"status": "alive"})

    async def _healthz(self, send: Send) -> None:
        await _send_json(send, 500 if self.state.failed_reason else 200, self.state.status().model_dump())

    async def _readyz(self, send: Send) -> None:
        await _send_json(send, 200 if self.state.is_ready else 503, self.state.status().model_dump())

    async def _metrics(self, send: Send) -> None:
        body = generate_latest(self.metrics.registry) + generate_latest(REGISTRY)
        await _send(send, 200, body, CONTENT_TYPE_LATEST)

    async def _timeline(self, send: Send) -> None:
        await _send_json(send, 200, self.state.timeline.model_dump(mode="json"))

    # vLLM's routes ------------------------------------------------------------------------
    async def _to_vllm(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, self.max_body_bytes)
        if scope["method"] == "POST":
            body = self._checked(scope["path"], _header(scope, "content-type"), body)
        server = await self.state.serving(self.ready_wait_s)
        answered = [False]

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered[0] = True
            await send(message)

        async def noticing_departure() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not answered[0]:
                self.metrics.client_gone.inc()
            return message

        await server.app(_with_body(scope, body), _replay(body, noticing_departure), _rewriting_errors(watched))

    def _checked(self, path: str, content_type: str, body: bytes) -> bytes:
        """The body vLLM gets: JSON, its parameters all taken, ``return_token_ids`` on by default."""
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaTypeError(f"request body must be application/json, not {content_type or 'untyped'!r}")
        data = decode_json(body)
        if not isinstance(data, dict):
            raise InvalidRequestError("request body must be a JSON object")
        taken = self.parameters().get(path)
        if taken is None:
            return body
        unknown = sorted(set(data) - taken)
        if unknown:
            raise InvalidRequestError(f"unsupported parameter(s) {', '.join(map(repr, unknown))} for {path}: this "
                                      "function takes the parameters of vLLM's OpenAI server", param=unknown[0],
                                      code="unsupported_parameter")
        data.setdefault("return_token_ids", True)
        return json.dumps(data).encode()

    def parameters(self) -> dict[str, frozenset[str]]:
        if self._parameters is None:
            self._parameters = accepted_parameters()
        return self._parameters

    # CloudEvents --------------------------------------------------------------------------
    async def _cloudevent(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive, self.max_body_bytes)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        event, mode = events.parse_event(headers, body)
        source = event_types.SOURCE_PREFIX + (self.state.function_name or "local")
        try:
            path, data = events.request_of(event)
            status, answer = await self._call_vllm(scope, path, data)
            if status != 200:
                raise _error_of(status, answer)
            out, code = events.reply(event, source, answer), 200
        except HydraError as exc:
            out, code = events.error_reply(event, source, exc)
        except Exception as exc:  # a poison event: answered so that Eventing dead-letters it
            log.exception("event %s could not be processed", event.get_id())
            out, code = events.error_reply(event, source, EngineError(
                f"the event could not be processed: {type(exc).__name__}"))
        reply_headers, reply_body = events.encode(out, mode)
        await _send(send, code, reply_body, reply_headers.pop("content-type", "application/json"), reply_headers)

    async def _call_vllm(self, scope: Scope, path: str, data: dict[str, Any]) -> tuple[int, Any]:
        """One OpenAI request through the same door as HTTP's; its status and decoded body."""
        body = self._checked(path, "application/json", json.dumps(data).encode())
        server = await self.state.serving(self.ready_wait_s)
        inner = {**scope, "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "headers": [(b"content-type", b"application/json")]}
        captured: dict[str, Any] = {"status": 500, "body": b""}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
            elif message["type"] == "http.response.body":
                captured["body"] += message.get("body", b"")

        async def never_disconnects() -> Message:  # the event's client waits for the whole reply
            await asyncio.Event().wait()  # (vLLM listens for a disconnect while it answers)
            raise AssertionError("unreachable")

        await server.app(_with_body(inner, body), _replay(body, never_disconnects), _rewriting_errors(capture))
        try:
            return captured["status"], json.loads(captured["body"] or b"null")
        except ValueError:
            return captured["status"], captured["body"].decode("utf-8", "replace")


def _error_of(status: int, body: Any) -> HydraError:
    """An error response of ours (rewritten from vLLM's) as its class again."""
    return error_from_response(status, body, source="vLLM")


def vllm_error(status: int, body: Any) -> HydraError:
    """vLLM's JSON error as our class: by status, a context overflow as ContextLengthError."""
    error = body.get("error") if isinstance(body, dict) else None
    message = str(error.get("message") if isinstance(error, dict) else body)
    param = error.get("param") if isinstance(error, dict) and isinstance(error.get("param"), str) else None
    if status == 400 and "maximum context length" in message:
        return ContextLengthError(message, param=param or "prompt")
    return class_for_status(status, None)(message, param=param)


def _rewriting_errors(send: Send) -> Send:
    """A send that turns vLLM's JSON error responses into ours (streams pass untouched)."""
    held: dict[str, Any] = {}

    async def rewriting(message: Message) -> None:
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] >= 400 and content_type.startswith(b"application/json"):
                held["start"], held["body"] = message, b""
                return
            await send(message)
            return
        if "start" not in held or message["type"] != "http.response.body":
            await send(message)
            return
        held["body"] += message.get("body", b"")
        if message.get("more_body"):
            return
        status = held["start"]["status"]
        try:
            decoded = json.loads(held["body"])
        except ValueError:
            decoded = held["body"].decode("utf-8", "replace")
        error = vllm_error(status, decoded)
        await _send_json(send, status, error.to_openai())

    return rewriting


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequestError("the client closed the connection before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the client's connection (vLLM sees it leave and aborts the request)."""
    sent = [False]

    async def replay() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_body(scope: Scope, body: bytes) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"transfer-encoding")]
    return {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}


def _header(scope: Scope, name: str) -> str:
    wanted = name.encode()
    return next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == wanted), "")


async def _send_error(send: Send, exc: HydraError) -> None:
    headers = {"retry-after": str(max(1, round(exc.retry_after_s)))} if exc.retry_after_s is not None else {}
    await _send_json(send, exc.status, exc.to_openai(), headers)


async def _send_json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    await _send(send, status, json.dumps(body).encode(), "application/json", headers)


async def _send(send: Send, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items() if k.lower() != "content-length"]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
