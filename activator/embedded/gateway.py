"""The local activator gateway: find the function, park the request through a cold start,
forward it, scale out while demand exceeds the instances, scale idle instances in.

Request path, in order: read the body (over the limit: 413 before anything starts) -> resolve
the function (path prefix /functions/<name>/, Host <name>.<domain> naming a registered
function, or the OpenAI routes' ``model``) -> scaler.acquire (parks at zero and while every
instance is full; bounded queue and deadline) -> proxy to the instance (streaming) ->
scaler.release. A request the instance failed before answering (it has no token yet) fails
the instance and is sent again to a fresh one (activator/embedded/relay.py); a stream the
instance broke off ends with an error event. The gateway's own routes (/healthz, /metrics,
/v1/functions, /v1/models) are never shadowed by a Host and never wait for a function; the
admin routes (/v1/functions...) need the gateway's bearer token, the function and OpenAI
routes are the public way in. A
reaper task scales idle instances in with the injected clock (each function's keep-alive from its
own idle-time history: provider/keepalive.py), pre-warms functions due for it, and fails
instances whose workers the backend lost. A CloudEvent the gateway fails itself (no such
function, failed to start, overloaded, body too large) is answered with a ``dev.hydraserve.error``
event in its own mode, as its function would (docs/CLOUDEVENTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hydraserve import http_events
from hydraserve.activator.embedded.admin_routes import add_admin_routes
from hydraserve.activator.embedded.metrics import UNKNOWN_FUNCTION, GatewayMetrics
from hydraserve.activator.embedded.proxy import GATEWAY_STOPPING, InstanceProxy
from hydraserve.activator.embedded.relay import relay
from hydraserve.activator.embedded.scaler import FunctionScaler
from hydraserve.auth import Authenticate, admin_only, bearer
from hydraserve.contracts import events
from hydraserve.contracts.backend import FunctionBackend, WorkerLog
from hydraserve.contracts.function import FunctionConfig
from hydraserve.contracts.timeline import Timeline
from hydraserve.contracts.worker import FUNCTION_ROUTES
from hydraserve.errors import (
    ConflictError,
    HydraError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    UnauthorizedError,
)
from hydraserve.http_errors import framework_error, retry_after_header
from hydraserve.http_json import decode_json, validate

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BODY_BYTES = 1 << 20  # as the runtime's limit: a larger body is refused before a cold start
ADMIN_PREFIX = "/v1/functions"
METRICS = web.AppKey("metrics", GatewayMetrics)
FUNCTION = web.RequestKey("function", str)  # the function a request is counted under
BODY = web.RequestKey("body", bytes)  # the request's body, once read


class Gateway:
    """Registry of functions and their scalers, the proxy, the reaper."""

    def __init__(self, backend: FunctionBackend, *, clock: Callable[[], float] = time.monotonic,
                 reap_interval_s: float = 1.0, drain_timeout_s: float = 30.0) -> None:
        self.backend = backend
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._scalers: dict[str, FunctionScaler] = {}
        self._reap_interval_s = reap_interval_s
        self._reaper: asyncio.Task[None] | None = None
        self._deleting: set[asyncio.Task[int]] = set()  # deletes under way (aclose waits for them)
        self._forwarding: set[asyncio.Task[Any]] = set()  # requests under way, parked or streaming
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="backend")
        self.proxy = InstanceProxy()
        self.metrics = GatewayMetrics()

    def register(self, config: FunctionConfig) -> FunctionScaler:
        """Host ``config`` (its model already prepared by the backend, or to be read on demand)."""
        if config.name in self._scalers:
            raise ConflictError(f"function {config.name!r} already exists", param="name")
        scaler = FunctionScaler(config, self.backend, executor=self._executor, metrics=self.metrics,
                                clock=self._clock)
        self._scalers[config.name] = scaler
        return scaler

    async def create(self, config: FunctionConfig) -> FunctionScaler:
        """Deploy a function at run time: its model is read now, then it is hosted at zero."""
        if config.name in self._scalers:
            raise ConflictError(f"function {config.name!r} already exists", param="name")
        await self._prepare(config, new_model=True)
        log.info("function %s created (model %s)", config.name, config.model_uri)
        return self.register(config)

    async def update(self, name: str, fields: dict[str, Any]) -> tuple[FunctionScaler, dict[str, Any]]:
        """Change some of a function's settings: the merged config is checked and its model read
        as create does (the description depends on the SLOs too), then swapped in; the next cold
        start uses it, instances already running serve on. The scaler and what changed (old, new)."""
        scaler = self.scaler(name)
        old = scaler.config
        config = validate(FunctionConfig, old.model_dump() | _changeable(name, fields))
        await self._prepare(config, new_model=config.model_uri != old.model_uri)
        if self._scalers.get(name) is not scaler:  # deleted while its model was read
            raise NotFoundError(f"unknown function {name!r}", param="function")
        scaler.update_config(config)
        changed = {k: (v, getattr(config, k)) for k, v in old.model_dump().items() if getattr(config, k) != v}
        log.info("function %s updated: %s", name, ", ".join(f"{k}={new}" for k, (_, new) in changed.items()) or "no change")
        return scaler, changed

    async def _prepare(self, config: FunctionConfig, *, new_model: bool) -> None:
        """Read ``config``'s model description now (at deploy time, not at a cold start): one that
        cannot be read is refused, nothing starts. A new model must be in S3 (a local path
        would be read on this host now and on a node later: it failed there, retried forever)."""
        if new_model and not config.model_uri.startswith("s3://"):
            raise InvalidRequestError(f"model_uri {config.model_uri!r}: a function's model lives in S3 "
                                      "(s3://bucket/prefix); push a directory first: hydraserve model push DIR "
                                      "s3://bucket/prefix", param="model_uri")
        try:
            await self.blocking(self.backend.prepare, config)
        except HydraError as exc:
            if exc.retryable:
                raise
            raise InvalidRequestError(f"model {config.model_uri}: {exc.message}", param="model_uri") from None
        except ValueError as exc:  # a model URI no reader can take, settings its model cannot have
            raise InvalidRequestError(f"function {config.name}: {exc}", param="model_uri") from None

    async def delete(self, name: str) -> int:
        """Stop taking requests for ``name`` (new ones get 404), let those under way finish (up to
        the drain time), stop its instances; how many it stopped."""
        scaler = self.scaler(name)
        del self._scalers[name]
        # shielded and kept: a caller that gives up (its handler cancelled) must not leave the
        # instances of a function nobody knows any more running
        task = asyncio.get_running_loop().create_task(self._drain_and_stop(scaler))
        self._deleting.add(task)
        task.add_done_callback(self._deleting.discard)
        return await asyncio.shield(task)

    async def _drain_and_stop(self, scaler: FunctionScaler) -> int:
        if not await scaler.drain(self._drain_timeout_s):
            log.warning("function %s deleted with requests still under way after %.0f s", scaler.config.name,
                        self._drain_timeout_s)
        stopped = len(scaler.instances)
        await scaler.shutdown()
        log.info("function %s deleted", scaler.config.name)
        return stopped

    def scaler(self, name: str) -> FunctionScaler:
        scaler = self._scalers.get(name)
        if scaler is None:
            raise NotFoundError(f"unknown function {name!r}", param="function")
        return scaler

    def has(self, name: str) -> bool:
        return name in self._scalers

    def functions(self) -> list[FunctionScaler]:
        return list(self._scalers.values())

    async def start(self, _app: web.Application | None = None) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    @contextlib.contextmanager
    def forwarding(self) -> Iterator[None]:
        """Counts the current request as under way until it is answered (see ``drain``)."""
        task = asyncio.current_task()
        assert task is not None
        self._forwarding.add(task)
        try:
            yield
        finally:
            self._forwarding.discard(task)

    async def drain(self, _app: web.Application | None = None) -> None:
        """On shutdown, the listener closed: requests under way get the drain time; then each one
        left is ended by the gateway (a stream with an error event and its end, a parked request
        with a 503), so no client is cut off without a word (issue 22 item 9: 94 of 150 streams
        were, and the exit took twice the drain time: aiohttp waits it out twice)."""
        if await self._all_answered(self._drain_timeout_s):
            return
        log.warning("%d request(s) still under way after the %.0f s drain: ending them", len(self._forwarding),
                    self._drain_timeout_s)
        for task in list(self._forwarding):
            task.cancel(GATEWAY_STOPPING)
        await self._all_answered(5.0)

    async def _all_answered(self, timeout_s: float) -> bool:
        """Waits (up to ``timeout_s``) until no request is under way (the tasks themselves serve
        on: a kept-alive connection's next request); whether none is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._forwarding and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return not self._forwarding

    async def aclose(self, _app: web.Application | None = None) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await asyncio.gather(*(s.shutdown() for s in self.functions()), *self._deleting, return_exceptions=True)
        await self.proxy.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def reap(self) -> None:
        """One reaper tick (the loop runs it every reap_interval_s; tests call it)."""
        for scaler in self.functions():
            try:
                await scaler.accrue_usage()
                await scaler.check_instances()
                await scaler.scale_in_idle(self._clock())
                await scaler.prewarm_if_due(self._clock())
            except Exception:
                log.exception("reaping %s failed", scaler.config.name)
            self.metrics.instances.labels(scaler.config.name).set(len(scaler.instances))

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval_s)
            await self.reap()

    def cold_start_timeline(self, name: str) -> Timeline:
        """Gateway events of the last cold start merged with its instance's own (blocks: it asks
        the instance; callable from any thread)."""
        scaler = self.scaler(name)
        timeline = scaler.last_timeline or Timeline()
        for instance in list(scaler.instances.values()):
            if instance.timeline is timeline:
                try:
                    timeline = timeline.merged(self.backend.worker_timeline(instance.endpoint))
                except Exception as exc:
                    log.warning("could not read the instance's timeline: %s", exc)
        return timeline

    def worker_logs(self, name: str, tail: int) -> list[WorkerLog]:
        """The function's workers' last ``tail`` lines (blocks: it reads files or asks nodes)."""
        self.scaler(name)
        return self.backend.worker_logs(name, tail)

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the gateway's thread pool (backend calls block)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _changeable(name: str, fields: Any) -> dict[str, Any]:
    """An update's fields, each a FunctionConfig setting (a misspelt one would be ignored
    silently, and the user told it changed); a function keeps its name."""
    if not isinstance(fields, dict):
        raise InvalidRequestError("request body must be a JSON object")
    unknown = sorted(set(fields) - set(FunctionConfig.model_fields))
    if unknown:
        raise InvalidRequestError(f"{unknown[0]}: not a function setting", param=unknown[0])
    if fields.get("name", name) != name:
        raise InvalidRequestError("name: a function cannot be renamed (create another)", param="name")
    return fields


# the app ----------------------------------------------------------------------------------

async def _error_response(request: web.Request, exc: HydraError, status: int | None = None) -> web.Response:
    """``exc`` in OpenAI's error shape; to a CloudEvent, inside an error event in the request's
    own mode, as the function's worker answers (an Eventing broker reads events, not JSON)."""
    status = status or exc.status
    headers = {k.lower(): v for k, v in request.headers.items()}
    mode = http_events.mode_of(headers)
    if mode is None:
        response = web.json_response(exc.to_openai(), status=status)
    else:
        event = http_events.error_event(_event_source(request), exc, await _event_subject(request, headers, exc))
        event_headers, body = http_events.encode(event, mode)
        response = web.Response(body=body, status=status, headers=event_headers)
    retry_after = retry_after_header(exc)
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return response


async def _event_subject(request: web.Request, headers: dict[str, str], exc: HydraError) -> str | None:
    """The id of the event an error is about: a binary event's from its headers, a structured
    one's from its body, read now if the request failed before reading it (unless refused for
    its size)."""
    body = request.get(BODY)
    unread = body is None and not isinstance(exc, PayloadTooLargeError)
    if unread and http_events.mode_of(headers) == "structured":
        with contextlib.suppress(HydraError):
            body = await _read_body(request)
    return http_events.event_id(headers, body)


def _event_source(request: web.Request) -> str:
    """An error event's source: the function's own, when the request named one the gateway hosts."""
    name = request.get(FUNCTION, UNKNOWN_FUNCTION)
    return events.GATEWAY_SOURCE if name == UNKNOWN_FUNCTION else events.SOURCE_PREFIX + name


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """Every failure in OpenAI's error shape (as hydraserve.http_errors does for Flask apps; to
    a CloudEvent, as an error event), and each function request counted by its status."""
    metrics: GatewayMetrics = request.app[METRICS]
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except HydraError as exc:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        status = exc.status
        return await _error_response(request, exc)
    except web.HTTPException as exc:
        status = exc.status
        message = exc.reason if exc.text is None else exc.text.removeprefix(f"{exc.status}: ")
        return await _error_response(request, framework_error(exc.status, message), exc.status)
    except asyncio.CancelledError:
        status = 499  # nginx's "client closed request"
        if FUNCTION in request:
            metrics.client_disconnects.labels(request[FUNCTION]).inc()
        raise
    except Exception as exc:
        log.exception("unhandled error")
        return await _error_response(request, HydraError(f"internal error: {type(exc).__name__}"))
    finally:
        if FUNCTION in request and status != 499:
            metrics.requests.labels(request[FUNCTION], str(status)).inc()


def _admin_auth(authenticate: Authenticate) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        if request.path.startswith(ADMIN_PREFIX) and authenticate(bearer(request.headers.get("Authorization", ""))) is None:
            raise UnauthorizedError("the gateway's admin routes need its bearer token")
        return await handler(request)
    return middleware


def _host_function(gateway: Gateway, request: web.Request) -> str | None:
    """The function a Host header ``<name>.<domain>`` names, if it is registered (an address or
    a bare name never is: ``127.0.0.1`` is not function ``127``)."""
    host = (request.host or "").rsplit(":", 1)[0].strip("[]")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return None
    name, dot, _domain = host.partition(".")
    return name if dot and gateway.has(name) else None


async def _read_body(request: web.Request) -> bytes:
    """The whole body, refused with a 413 by its declared length before anything is read; kept
    in the request (an error about a structured CloudEvent names the event's id)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise PayloadTooLargeError(f"request body of {request.content_length} bytes is over the "
                                   f"{MAX_BODY_BYTES} byte limit")
    try:
        request[BODY] = await request.read()
        return request[BODY]
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLargeError(f"request body is over the {MAX_BODY_BYTES} byte limit") from None
    except RequestPayloadError as exc:  # a malformed chunked body, say
        raise InvalidRequestError(f"request body could not be read: {exc}") from None


def _model_of(body: bytes) -> str | None:
    """The ``model`` an OpenAI request body names (a bad body is the function's to refuse,
    unless it cannot even be routed)."""
    data = decode_json(body)
    model = data.get("model") if isinstance(data, dict) else None
    if model is not None and not isinstance(model, str):
        raise InvalidRequestError("model: must be a string", param="model")
    return model


def create_gateway_app(gateway: Gateway, admin_token: str) -> web.Application:
    app = web.Application(middlewares=[_errors, _admin_auth(admin_only(admin_token))], client_max_size=MAX_BODY_BYTES)
    app[METRICS] = gateway.metrics
    app.on_startup.append(gateway.start)
    app.on_shutdown.append(gateway.drain)
    app.on_cleanup.append(gateway.aclose)

    async def forward(request: web.Request, name: str, path: str, body: bytes | None = None) -> web.StreamResponse:
        request[FUNCTION] = name if gateway.has(name) else UNKNOWN_FUNCTION
        scaler = gateway.scaler(name)
        path = "/" + path.lstrip("/")
        if (request.method, path) not in FUNCTION_ROUTES:  # a favicon or a scan must not wake a function
            raise NotFoundError(f"function {name!r} has no route {request.method} {path}: it serves "
                                + ", ".join(f"{m} {p}" for m, p in sorted(FUNCTION_ROUTES)))
        body = await _read_body(request) if body is None else body
        with gateway.forwarding():
            return await relay(gateway, request, scaler, name, path, body)

    async def by_path(request: web.Request) -> web.StreamResponse:
        return await forward(request, request.match_info["name"], request.match_info.get("path", ""))

    async def by_host(request: web.Request) -> web.StreamResponse:
        name = _host_function(gateway, request)
        if name is None:
            request[FUNCTION] = UNKNOWN_FUNCTION
            raise NotFoundError(f"no function at {request.path!r}: use /functions/<name>/..., a Host "
                                "<name>.<domain> naming a function, or /v1/completions with a model")
        return await forward(request, name, request.path)

    async def openai_route(request: web.Request) -> web.StreamResponse:
        """/v1/completions and /v1/chat/completions: the Host's function, else the body's model."""
        name = _host_function(gateway, request)
        body = await _read_body(request)
        if name is None:
            model = _model_of(body)
            if model is None or not gateway.has(model):
                request[FUNCTION] = UNKNOWN_FUNCTION
                raise NotFoundError(f"The model {model!r} does not exist" if model else "model: a model is required",
                                    param="model", code="model_not_found")
            name = model
        return await forward(request, name, request.path, body)

    async def models(request: web.Request) -> web.Response:
        host = _host_function(gateway, request)
        names = [host] if host else [s.config.name for s in gateway.functions()]
        return web.json_response({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "hydraserve"} for n in names]})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(gateway.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    methods: Any = "*"
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    add_admin_routes(app.router, gateway, _read_body)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", openai_route)
    app.router.add_post("/v1/chat/completions", openai_route)
    app.router.add_route(methods, "/functions/{name}", by_path)
    app.router.add_route(methods, "/functions/{name}/{path:.*}", by_path)
    app.router.add_route(methods, "/{path:.*}", by_host)
    return app
