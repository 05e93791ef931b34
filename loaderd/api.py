"""loaderd's local HTTP API (Flask app; served by hydraserve.loaderd.daemon with waitress).

Every /v1 route needs ``Authorization: Bearer <token>``; /healthz and /metrics do not (they
reveal nothing but counters). The daemon's own token (its node's admin token, hydraserve.auth)
may do everything; a worker's token (signed for this node, not expired) may only read its own
model (index, file, attach) and release its own leases (and renew its heartbeat leases); a peer
daemon's token only reads byte ranges (/v1/range). A lease tied to a pid must be tied to the
caller's own process (loaderd.peer); a worker in another PID namespace (a pod) takes a heartbeat
lease instead. Bodies are the pydantic models of hydraserve.contracts.loader;
errors come back in the OpenAI error shape from hydraserve.http_errors. docs/LOADERD.md lists
the routes.
"""

from __future__ import annotations

from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hydraserve.auth import NodeKeys, Principal, install_bearer_auth, loaderd_authenticator
from hydraserve.contracts.loader import AttachRequest, PrefetchRequest, ReleaseRequest
from hydraserve.errors import ForbiddenError, InvalidRequestError
from hydraserve.http_errors import install_error_handlers
from hydraserve.http_json import json_body
from hydraserve.loaderd.peer import pid_owns_connection
from hydraserve.loaderd.service import LoaderService

MAX_BODY = 1 << 20


def _int_arg(name: str) -> int:
    raw = request.args.get(name, "")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19):
        raise InvalidRequestError(f"query parameter {name} must be a non-negative integer", param=name)
    return int(raw)


def create_app(service: LoaderService, keys: NodeKeys) -> Flask:
    """The Flask app over one LoaderService, checking the node's ``keys`` (its admin token, a
    worker token signed for it, a peer token for it) on every route but /healthz and /metrics."""
    app = Flask("hydraserve.loaderd")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    install_error_handlers(app)
    install_bearer_auth(app, loaderd_authenticator(keys, service.registry.clock))

    @app.before_request
    def _peers_read_ranges_only() -> None:
        principal: Principal | None = g.get("principal")
        if principal is not None and principal.peer and request.path != "/v1/range":
            raise ForbiddenError("a peer token may only read byte ranges (/v1/range)")

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"ok": True, "node": service.config.node_name})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/v1/prefetch")
    def prefetch() -> Response:
        _admin()
        return jsonify(service.prefetch(json_body(PrefetchRequest)).model_dump(mode="json"))

    @app.post("/v1/attach")
    def attach() -> Response:
        req = json_body(AttachRequest)
        _may_read(req.model_uri)
        if not _caller().admin:
            if req.peers:  # the daemon would call out to them with its peer credential
                raise ForbiddenError("a worker's token may not name peers", param="peers")
            if req.pid is None and req.heartbeat_s is None:  # else the lease would outlive the worker
                raise ForbiddenError("a worker's lease must name its pid or a heartbeat", param="pid")
        if req.pid is not None:
            _callers_own(req.pid)
        return jsonify(service.attach(req, owner=_caller().subject).model_dump(mode="json"))

    @app.post("/v1/release")
    def release() -> Response:
        owner = None if _caller().admin else _caller().subject
        return jsonify(service.release(json_body(ReleaseRequest), owner=owner).model_dump(mode="json"))

    @app.post("/v1/renew")
    def renew() -> Response:
        owner = None if _caller().admin else _caller().subject
        return jsonify(service.renew(json_body(ReleaseRequest), owner=owner).model_dump(mode="json"))

    @app.get("/v1/status")
    def status() -> Response:
        _admin()
        return jsonify(service.status().model_dump(mode="json"))

    @app.get("/v1/index")
    def index() -> Response:
        model_uri = request.args.get("model_uri", "")
        if not model_uri:
            raise InvalidRequestError("model_uri is required", param="model_uri")
        _may_read(model_uri)
        answer = service.index(model_uri, request.args.get("endpoint_url") or None)
        return jsonify(answer.model_dump(mode="json"))

    @app.get("/v1/file")
    def read_file() -> Response:
        model_uri, name = request.args.get("model_uri", ""), request.args.get("name", "")
        if not model_uri or not name:
            raise InvalidRequestError("model_uri and name are required")
        _may_read(model_uri)
        data = service.read_file(model_uri, request.args.get("endpoint_url") or None, name)
        return Response(data, mimetype="application/octet-stream")

    @app.get("/v1/range")
    def read_range() -> Response:
        if not _caller().peer:
            _admin()
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


def _caller() -> Principal:
    principal: Principal = g.principal
    return principal


def _admin() -> None:
    if not _caller().admin:
        raise ForbiddenError("this route needs the daemon's own token, not a worker's")


def _may_read(model_uri: str) -> None:
    caller = _caller()
    if not caller.admin and caller.model_uri != model_uri:
        raise ForbiddenError("this token may read only its own model", param="model_uri")


def _callers_own(pid: int) -> None:
    """A lease may be tied only to the calling process (pid 1 would pin it forever)."""
    client = (request.environ.get("REMOTE_ADDR", ""), int(request.environ.get("REMOTE_PORT") or 0))
    server_port = int(request.environ.get("SERVER_PORT") or 0)
    if not pid_owns_connection(pid, client, server_port):
        raise ForbiddenError(f"pid {pid} is not the process making this request", param="pid")
