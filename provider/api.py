"""The placement service's HTTP API (Flask app; `hydraserve placement` serves it with waitress).

Routes (bodies are hydraserve.contracts.plan models; docs/PLACEMENT.md has examples):
  POST /v1/nodes    NodeInfo -> NodeStatus        register or update a node
  DELETE /v1/nodes/<name>                         forget a node (409 while a plan has a stage there)
  POST /v1/plan     PlanRequest -> Plan           choose and reserve (dry_run: explain only)
  POST /v1/reports  WorkerReport -> ReportAck     ready / failed / released / consolidated
  GET  /v1/plans/<id>                             a plan still active
  GET  /v1/cluster  ClusterStatus
  GET  /metrics     Prometheus text; GET /healthz
Every route but /healthz and /metrics needs ``Authorization: Bearer <token>`` (without it one
local request could register a fake node or feed fake timings to the calibration).
Invalid bodies get 400 in the OpenAI error shape via hydraserve.http_errors; no capacity is 503
with Retry-After (the caller retries), an unknown plan 404. Given ``serving``, a replica for which
it is false (on Kubernetes: one not holding the Lease, whose view of the cluster nobody feeds)
answers every /v1 route 503 ``not_leader`` with Retry-After, so two replicas behind one Service
never plan from different states; /healthz and /metrics answer on every replica.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hydraserve.auth import admin_only, install_bearer_auth
from hydraserve.contracts.plan import NodeInfo, PlanRequest, WorkerReport
from hydraserve.errors import NotFoundError, TemporaryError
from hydraserve.http_errors import install_error_handlers
from hydraserve.http_json import json_body
from hydraserve.provider.service import PlacementService

MAX_BODY = 4 << 20
NOT_LEADER_RETRY_S = 2.0  # a follower campaigns this often: the new leader answers within a few of these


def create_app(service: PlacementService, token: str, *, serving: Callable[[], bool] | None = None) -> Flask:
    """The Flask app over one PlacementService, checking ``token`` on every /v1 route and, given
    ``serving``, answering them only while it is true."""
    app = Flask("hydraserve.provider")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    install_error_handlers(app)
    install_bearer_auth(app, admin_only(token))
    if serving is not None:
        _serve_only_while(app, serving)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"ok": True, "policy": service.policy.name, "nodes": service.cluster.size})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    @app.post("/v1/nodes")
    def register_node() -> Response:
        return jsonify(service.register_node(json_body(NodeInfo)).model_dump(mode="json"))

    @app.delete("/v1/nodes/<name>")
    def remove_node(name: str) -> Response:
        service.remove_node(name)
        return jsonify({"name": name, "removed": True})

    @app.post("/v1/plan")
    def plan() -> Response:
        return jsonify(service.plan(json_body(PlanRequest)).model_dump(mode="json"))

    @app.post("/v1/reports")
    def report() -> Response:
        return jsonify(service.report(json_body(WorkerReport)).model_dump(mode="json"))

    @app.get("/v1/plans/<plan_id>")
    def get_plan(plan_id: str) -> Response:
        plan = service.plan_of(plan_id)
        if plan is None:
            raise NotFoundError(f"no active plan {plan_id!r}", param="plan_id")
        return jsonify(plan.model_dump(mode="json"))

    @app.get("/v1/cluster")
    def cluster() -> Response:
        return jsonify(service.status().model_dump(mode="json"))

    return app


def _serve_only_while(app: Flask, serving: Callable[[], bool]) -> None:
    """Refuse the /v1 routes (503, Retry-After) while ``serving()`` is false: this replica's
    placement state is not the one the cold starts use."""
    @app.before_request
    def _leader_only() -> None:
        if request.path.startswith("/v1/") and not serving():
            raise TemporaryError("this replica does not lead: its placement state is not the cluster's; "
                                 "try again (another replica answers)", code="not_leader",
                                 retry_after_s=NOT_LEADER_RETRY_S)
