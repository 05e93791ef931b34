"""Flask app of one runtime worker: the routes, health, readiness, metrics, timeline.

Assembled here in one place. Health is true while the process can serve or is still starting;
readiness only once the engine (for a pipeline group: the whole group) can serve and no
drain is under way. Knative probes GET /healthz with header K-Network-Probe: queue.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hydraserve.http_errors import install_error_handlers
from hydraserve.runtime.server.cloudevents_api import create_cloudevents_blueprint
from hydraserve.runtime.server.metrics import RuntimeMetrics
from hydraserve.runtime.server.openai_api import create_openai_blueprint
from hydraserve.runtime.server.state import RuntimeState

MAX_BODY_BYTES = 1 << 20
_UNCOUNTED = {"/healthz", "/readyz", "/metrics"}


def create_app(state: RuntimeState, *, metrics: RuntimeMetrics | None = None, api: bool = True,
               ready_wait_s: float = 120.0, max_body_bytes: int = MAX_BODY_BYTES) -> Flask:
    """The worker's app; ``api`` (the head) adds the OpenAI and CloudEvents routes."""
    app = Flask("hydraserve.runtime")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    metrics = metrics or RuntimeMetrics()
    app.extensions["hydraserve.metrics"] = metrics
    install_error_handlers(app)
    if api:
        app.register_blueprint(create_openai_blueprint(state, metrics, ready_wait_s))
        app.register_blueprint(create_cloudevents_blueprint(state, ready_wait_s))

    @app.before_request
    def _enter() -> None:
        g.start = time.monotonic()
        if request.path not in _UNCOUNTED:
            state.enter()
            metrics.inflight.inc()
            g.counted = True

    @app.after_request
    def _account(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(route, str(response.status_code)).inc()
        if g.get("counted"):
            def _leave() -> None:  # after the last byte of a streamed body
                metrics.latency.labels(route).observe(time.monotonic() - g_start)
                metrics.inflight.dec()
                state.leave()
            g_start = g.start
            response.call_on_close(_leave)
        return response

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        body = state.status()
        return jsonify(body), 500 if state.failed_reason else 200

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        return jsonify(state.status()), 200 if state.is_ready else 503

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.get("/v1/hydraserve/timeline")
    def timeline() -> Response:
        return jsonify(state.timeline.model_dump())

    return app
