"""The local activator gateway: find the function, hold the request through a cold start,
forward it, and scale idle functions to zero.

Request path, in order: resolve the function (path prefix /functions/<name>/ or Host
<name>.<domain>) -> scaler.acquire (buffers at zero; bounded queue and deadline) -> proxy to
the instance (streaming) -> scaler.release when the body is done. A request the instance
failed before answering (it has no token yet) fails the instance and is sent again to a fresh
one, up to MAX_INSTANCE_RETRIES times; a stream the instance broke off ends with an error
event. A reaper thread scales idle functions down with the injected clock and fails instances
whose workers the backend lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from hydraserve.activator.functions import FunctionConfig
from hydraserve.activator.ports import Endpoint, FunctionBackend
from hydraserve.activator.proxy import InstanceProxy
from hydraserve.activator.scaler import FunctionScaler
from hydraserve.contracts.timeline import Timeline
from hydraserve.errors import InstanceFailedError, NotFoundError
from hydraserve.http_errors import install_error_handlers

log = logging.getLogger(__name__)

MAX_INSTANCE_RETRIES = 2  # a request is sent to at most three instances


class Gateway:
    """Registry of functions and their scalers, plus the reaper."""

    def __init__(self, backend: FunctionBackend, *, clock: Callable[[], float] = time.monotonic,
                 reap_interval_s: float = 1.0) -> None:
        self.backend = backend
        self._clock = clock
        self._scalers: dict[str, FunctionScaler] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reap_interval_s = reap_interval_s
        self._reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)
        self.proxy = InstanceProxy()
        self.registry = CollectorRegistry()
        self.requests = Counter("hydraserve_gateway_requests_total", "Requests by function and status",
                                ["function", "status"], registry=self.registry)
        self.cold_starts = Counter("hydraserve_gateway_cold_starts_total", "Cold starts begun",
                                   ["function"], registry=self.registry)
        self.instance_failures = Counter("hydraserve_gateway_instance_failures_total",
                                         "Instances failed while serving (lost worker, broken group)",
                                         ["function"], registry=self.registry)
        self.retries = Counter("hydraserve_gateway_request_retries_total",
                               "Requests sent again to a fresh instance after theirs failed",
                               ["function"], registry=self.registry)
        self.ready = Gauge("hydraserve_gateway_function_ready", "1 while the function has an instance",
                           ["function"], registry=self.registry)

    def register(self, config: FunctionConfig) -> None:
        with self._lock:
            if config.name in self._scalers:
                raise ValueError(f"function {config.name} already registered")
            self._scalers[config.name] = FunctionScaler(config, self.backend, self._clock)

    def scaler(self, name: str) -> FunctionScaler:
        with self._lock:
            scaler = self._scalers.get(name)
        if scaler is None:
            raise NotFoundError(f"unknown function {name!r}", param="function")
        return scaler

    def functions(self) -> list[FunctionScaler]:
        with self._lock:
            return list(self._scalers.values())

    def start(self) -> Gateway:
        self._reaper.start()
        return self

    def close(self) -> None:
        self._stop.set()
        for scaler in self.functions():
            scaler.shutdown()

    def _reap_loop(self) -> None:
        while not self._stop.wait(self._reap_interval_s):
            for scaler in self.functions():
                try:
                    if scaler.check_instance():
                        self.instance_failures.labels(scaler.config.name).inc()
                    scaler.scale_down_if_idle(self._clock())
                except Exception:
                    log.exception("reaping %s failed", scaler.config.name)
                self.ready.labels(scaler.config.name).set(1 if scaler.state.value == "ready" else 0)

    def cold_start_timeline(self, name: str) -> Timeline:
        """Gateway events of the last cold start merged with the instance's own."""
        scaler = self.scaler(name)
        timeline = scaler.last_timeline or Timeline()
        if scaler.endpoint is not None:
            try:
                timeline = timeline.merged(self.backend.worker_timeline(scaler.endpoint))
            except Exception as exc:
                log.warning("could not read worker timeline: %s", exc)
        return timeline


def create_gateway_app(gateway: Gateway) -> Flask:
    app = Flask("hydraserve.activator")
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20
    install_error_handlers(app)

    def _forward(name: str, path: str) -> Response:
        scaler = gateway.scaler(name)
        for attempt in range(MAX_INSTANCE_RETRIES + 1):
            before = scaler.cold_starts
            endpoint = scaler.acquire()
            if scaler.cold_starts != before:
                gateway.cold_starts.labels(name).inc()

            def broken(reason: str, endpoint: Endpoint = endpoint) -> None:
                if scaler.instance_failed(endpoint, reason):
                    gateway.instance_failures.labels(name).inc()

            try:
                response = gateway.proxy.forward(endpoint.url, path, request, on_first_byte=scaler.first_response,
                                                 on_done=scaler.release, on_broken=broken)
            except InstanceFailedError as exc:
                broken(exc.message)
                if attempt == MAX_INSTANCE_RETRIES:
                    gateway.requests.labels(name, str(exc.status)).inc()
                    raise
                gateway.retries.labels(name).inc()
                log.warning("request to %s sent again after its instance failed: %s", name, exc.message)
                continue
            gateway.requests.labels(name, str(response.status_code)).inc()
            return response
        raise AssertionError("unreachable")

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]

    @app.route("/functions/<name>/", defaults={"path": ""}, methods=methods)
    @app.route("/functions/<name>/<path:path>", methods=methods)
    def by_path(name: str, path: str) -> Response:
        return _forward(name, path)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok"})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(gateway.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/functions")
    def list_functions() -> Response:
        return jsonify({"functions": [s.status() for s in gateway.functions()]})

    @app.get("/v1/functions/<name>/timeline")
    def timeline(name: str) -> Response:
        return jsonify(gateway.cold_start_timeline(name).model_dump())

    @app.route("/", defaults={"path": ""}, methods=methods)
    @app.route("/<path:path>", methods=methods)
    def by_host(path: str) -> Response:
        host = (request.host or "").split(":")[0]
        name = host.split(".")[0] if "." in host else ""
        if not name:
            raise NotFoundError("no function in the request: use /functions/<name>/... or "
                                "Host: <name>.<domain>")
        return _forward(name, path)

    return app
