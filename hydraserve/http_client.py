"""One HTTP client for the platform's internal JSON APIs (loaderd, the placement service).

A requests.Session to one service, with its bearer token on every call. Nothing answering is
UnreachableError (retryable: callers fall back or try later); an error response becomes the
very HydraError class the server raised (hydraserve.errors.error_from_response), so every
client maps errors the same way.
"""

from __future__ import annotations

from typing import Any

import requests

from hydraserve.errors import UnreachableError, error_from_response


class ServiceClient:
    """``ServiceClient("loaderd", "http://127.0.0.1:7070", token)``; thread-safe for requests."""

    def __init__(self, service: str, base_url: str, token: str | None = None, *, timeout_s: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.service = service
        self.url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                timeout_s: float | None = None) -> requests.Response:
        """The 2xx response; raises UnreachableError or the server's error."""
        try:
            resp = self.session.request(method, self.url + path, json=json, params=params, headers=self._headers,
                                        timeout=timeout_s or self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise UnreachableError(f"{self.service} at {self.url} did not answer: {exc}", retry_after_s=1.0) from exc
        if resp.status_code >= 400:
            try:
                body: Any = resp.json()
            except ValueError:
                body = resp.text
            raise error_from_response(resp.status_code, body, source=f"{self.service} {path}",
                                      retry_after=resp.headers.get("Retry-After"))
        return resp

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """GET /healthz answered 2xx (no token needed)."""
        try:
            return self.session.get(self.url + "/healthz", timeout=timeout_s).ok
        except requests.RequestException:
            return False

    def close(self) -> None:
        self.session.close()
