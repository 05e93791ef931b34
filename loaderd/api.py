"""loaderd's local HTTP API (Flask app; served by hydraserve.loaderd.daemon with waitress).

Every /v1 route needs ``Authorization: Bearer <token>``; /healthz and /metrics do not (they
reveal nothing but counters). Bodies are the pydantic models of hydraserve.contracts.loader;
errors come back in the OpenAI error shape from hydraserve.http_errors. docs/LOADERD.md lists
the routes.
"""

from __future__ import annotations

import hmac

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hydraserve.contracts.loader import AttachRequest, PrefetchRequest, ReleaseRequest
from hydraserve.errors import InvalidRequestError, UnauthorizedError
from hydraserve.http_errors import install_error_handlers
from hydraserve.http_json import json_body
from hydraserve.loaderd.service import LoaderService

MAX_BODY = 1 << 20


def _int_arg(name: str) -> int:
    raw = request.args.get(name, "")
    if not raw.isdigit():
        raise InvalidRequestError(f"query parameter {name} must be a non-negative integer", param=name)
    return int(raw)


def create_app(service: LoaderService, token: str) -> Flask:
    """The Flask app over one LoaderService, checking ``token`` on every /v1 route."""
    if len(token) < 16:
        raise ValueError("the loaderd token must be at least 16 characters")
    app = Flask("hydraserve.loaderd")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    install_error_handlers(app)
    expected = f"Bearer {token}".encode()

    @app.before_request
    def _auth() -> None:
        if request.path.startswith("/v1/"):
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                raise UnauthorizedError("missing or wrong bearer token")

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"ok": True, "node": service.config.node_name})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/v1/prefetch")
    def prefetch() -> Response:
        return jsonify(service.prefetch(json_body(PrefetchRequest)).model_dump(mode="json"))

    @app.post("/v1/attach")
    def attach() -> Response:
        return jsonify(service.attach(json_body(AttachRequest)).model_dump(mode="json"))

    @app.post("/v1/release")
    def release() -> Response:
        return jsonify(service.release(json_body(ReleaseRequest)).model_dump(mode="json"))

    @app.get("/v1/status")
    def status() -> Response:
        return jsonify(service.status().model_dump(mode="json"))

    @app.get("/v1/index")
    def index() -> Response:
        model_uri = request.args.get("model_uri", "")
        if not model_uri:
            raise InvalidRequestError("model_uri is required", param="model_uri")
        answer = service.index(model_uri, request.args.get("endpoint_url") or None)
        return jsonify(answer.model_dump(mode="json"))

    @app.get("/v1/file")
    def read_file() -> Response:
        model_uri, name = request.args.get("model_uri", ""), request.args.get("name", "")
        if not model_uri or not name:
            raise InvalidRequestError("model_uri and name are required")
        data = service.read_file(model_uri, request.args.get("endpoint_url") or None, name)
        return Response(data, mimetype="application/octet-stream")

    @app.get("/v1/range")
    def read_range() -> Response:
        model_key = request.args.get("model_key", "")
        file = request.args.get("file", "")
        if not model_key or not file:
            raise InvalidRequestError("model_key and file are required")
        start, end = _int_arg("start"), _int_arg("end")
        if end <= start:
            raise InvalidRequestError("end must be greater than start", param="end")
        data = service.read_range(model_key, file, start, end)
        return Response(data, mimetype="application/octet-stream")

    return app
