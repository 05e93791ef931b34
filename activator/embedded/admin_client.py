"""Typed client of the gateway's admin API (/v1/functions), for `hydraserve fn` and tests."""

from __future__ import annotations

from typing import Any

from hydraserve.http_client import ServiceClient

Records = list[dict[str, Any]]  # named here: the class's own `list` method hides the builtin


class GatewayAdminClient:
    def __init__(self, base_url: str, token: str, *, timeout_s: float = 120.0) -> None:
        self._http = ServiceClient("gateway", base_url, token, timeout_s=timeout_s)

    def create(self, config: dict[str, Any]) -> dict[str, Any]:
        """Deploy a function (FunctionConfig fields); the gateway reads its model's description."""
        answer: dict[str, Any] = self._http.request("POST", "/v1/functions", json=config).json()
        return answer

    def list(self) -> list[dict[str, Any]]:
        functions: list[dict[str, Any]] = self._http.request("GET", "/v1/functions").json()["functions"]
        return functions

    def describe(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._http.request("GET", f"/v1/functions/{name}").json()
        return answer

    def update(self, name: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Change some FunctionConfig fields; the next cold start uses them. Its status, config and
        ``changed`` ({field: {"from", "to"}})."""
        answer: dict[str, Any] = self._http.request("PATCH", f"/v1/functions/{name}", json=fields).json()
        return answer

    def logs(self, name: str, tail: int | None = None) -> Records:
        """The end of each worker's log: {"instance", "stage", "node", "log", "failed_start"}."""
        params = {} if tail is None else {"tail": tail}
        workers: Records = self._http.request("GET", f"/v1/functions/{name}/logs", params=params).json()["workers"]
        return workers

    def delete(self, name: str) -> dict[str, Any]:
        """Drain, scale to zero and forget the function; returns when it is gone."""
        answer: dict[str, Any] = self._http.request("DELETE", f"/v1/functions/{name}").json()
        return answer
