"""Typed client of the placement service, for the activator, the backends and the demo."""

from __future__ import annotations

from typing import TypeVar

import requests
from pydantic import BaseModel

from hydraserve.contracts.plan import (
    ClusterStatus,
    NodeInfo,
    NodeStatus,
    Plan,
    PlanRequest,
    ReportAck,
    WorkerReport,
)
from hydraserve.errors import (
    HydraError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    TemporaryError,
)

M = TypeVar("M", bound=BaseModel)
_BY_STATUS: dict[int, type[HydraError]] = {400: InvalidRequestError, 404: NotFoundError, 503: OverloadedError}


class PlacementClient:
    """One requests.Session to one service; raises the HydraError the service answered with."""

    def __init__(self, base_url: str, *, timeout_s: float = 10.0, session: requests.Session | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    def register_node(self, node: NodeInfo) -> NodeStatus:
        return self._call("POST", "/v1/nodes", node, NodeStatus)

    def plan(self, request: PlanRequest) -> Plan:
        return self._call("POST", "/v1/plan", request, Plan)

    def report(self, report: WorkerReport) -> ReportAck:
        return self._call("POST", "/v1/reports", report, ReportAck)

    def cluster(self) -> ClusterStatus:
        return self._call("GET", "/v1/cluster", None, ClusterStatus)

    def healthy(self) -> bool:
        try:
            return self.session.get(self.base_url + "/healthz", timeout=self.timeout_s).status_code == 200
        except requests.RequestException:
            return False

    def close(self) -> None:
        self.session.close()

    def _call(self, method: str, path: str, body: BaseModel | None, out: type[M]) -> M:
        try:
            r = self.session.request(method, self.base_url + path, timeout=self.timeout_s,
                                     json=None if body is None else body.model_dump(mode="json"))
        except requests.RequestException as exc:
            raise TemporaryError(f"placement service unreachable at {self.base_url}: {exc}",
                                 retry_after_s=1.0) from exc
        if r.status_code == 200:
            return out.model_validate(r.json())
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            err = {"message": r.text[:300]}
        cls = _BY_STATUS.get(r.status_code, TemporaryError if r.status_code >= 500 else InvalidRequestError)
        retry = r.headers.get("Retry-After")
        exc2 = cls(f"placement {path}: {err.get('message')}", param=err.get("param"), code=err.get("code"),
                   retry_after_s=float(retry) if retry else None)
        raise exc2
