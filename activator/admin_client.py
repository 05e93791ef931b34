"""Typed client of the gateway's admin API (/v1/functions), for `hydraserve fn` and tests."""

from __future__ import annotations

from typing import Any

from hydraserve.http_client import ServiceClient


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

    def delete(self, name: str) -> dict[str, Any]:
        """Drain, scale to zero and forget the function; returns when it is gone."""
        answer: dict[str, Any] = self._http.request("DELETE", f"/v1/functions/{name}").json()
        return answer
