"""Typed client of the placement service, for the activator, the backends and the demo. Errors
come back as the service raised them (hydraserve.http_client); none answering is UnreachableError."""

from __future__ import annotations

from typing import TypeVar
from urllib.parse import quote

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
from hydraserve.http_client import ServiceClient

M = TypeVar("M", bound=BaseModel)


class PlacementClient:
    """One requests.Session to one service."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 10.0,
                 session: requests.Session | None = None) -> None:
        self._http = ServiceClient("placement", base_url, token, timeout_s=timeout_s, session=session)
        self.base_url = self._http.url
        self.session = self._http.session

    def register_node(self, node: NodeInfo) -> NodeStatus:
        return self._call("POST", "/v1/nodes", node, NodeStatus)

    def remove_node(self, name: str) -> None:
        """Placement forgets node ``name`` (404 unknown; 409 while a plan has a stage there)."""
        self._http.request("DELETE", f"/v1/nodes/{quote(name, safe='')}")

    def plan(self, request: PlanRequest) -> Plan:
        return self._call("POST", "/v1/plan", request, Plan)

    def report(self, report: WorkerReport) -> ReportAck:
        return self._call("POST", "/v1/reports", report, ReportAck)

    def cluster(self) -> ClusterStatus:
        return self._call("GET", "/v1/cluster", None, ClusterStatus)

    def healthy(self) -> bool:
        return self._http.healthy()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: BaseModel | None, out: type[M]) -> M:
        json = None if body is None else body.model_dump(mode="json")
        return out.model_validate(self._http.request(method, path, json=json).json())
