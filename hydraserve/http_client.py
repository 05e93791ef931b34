"""One HTTP client for the platform's internal JSON APIs (loaderd, the placement service, a
node's warm pool over its Unix socket).

A requests.Session to one service, with its bearer token on every call (a string, or a callable
asked before each call: a token renewed while the client lives, hydraserve.auth.TokenFile).
Nothing listening is NotListeningError (the request never arrived); a request sent with no
answer back is UnreachableError (it may have been carried out); both are retryable. An error
response becomes the very HydraError class the server raised
(hydraserve.errors.error_from_response), so every client maps errors the same way.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from hydraserve.errors import NotListeningError, UnreachableError, error_from_response


class ServiceClient:
    """``ServiceClient("loaderd", "http://127.0.0.1:7070", token)``; thread-safe for requests."""

    def __init__(self, service: str, base_url: str, token: str | Callable[[], str] | None = None, *,
                 timeout_s: float = 30.0, session: requests.Session | None = None) -> None:
        self.service = service
        self.url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self._token = token

    def _headers(self) -> dict[str, str]:
        token = self._token() if callable(self._token) else self._token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                timeout_s: float | None = None) -> requests.Response:
        """The 2xx response; raises NotListeningError, UnreachableError or the server's error."""
        try:
            resp = self.session.request(method, self.url + path, json=json, params=params, headers=self._headers(),
                                        timeout=timeout_s or self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            never_arrived = isinstance(exc, requests.ConnectTimeout) or _refused(exc)
            cls = NotListeningError if never_arrived else UnreachableError
            raise cls(f"{self.service} at {self.url} did not answer: {exc}", retry_after_s=1.0) from exc
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


def _refused(exc: requests.RequestException) -> bool:
    """Whether the connection itself failed (nothing listening), so no byte of the request left."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None  # urllib3's MaxRetryError
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


class _UnixConnection(urllib3.connection.HTTPConnection):
    """An HTTP connection to a Unix socket (the host in the URL is only a name)."""

    def __init__(self, socket_path: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket_path = socket_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)  # urllib3 resolved it to seconds
        try:
            sock.connect(str(self._socket_path))
        except OSError as exc:
            sock.close()
            raise urllib3.exceptions.NewConnectionError(self, f"{self._socket_path}: {exc}") from exc
        return sock


class _UnixAdapter(HTTPAdapter):
    def __init__(self, socket_path: Path) -> None:
        super().__init__()
        self._pool = urllib3.HTTPConnectionPool("localhost")
        self._pool.ConnectionCls = lambda *a, **kw: _UnixConnection(socket_path, *a, **kw)  # type: ignore[assignment]

    def get_connection_with_tls_context(self, request: requests.PreparedRequest, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> urllib3.HTTPConnectionPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


def unix_socket_session(socket_path: Path) -> requests.Session:
    """A session whose every ``http://unix/...`` request goes to ``socket_path``."""
    session = requests.Session()
    session.mount("http://unix/", _UnixAdapter(socket_path))
    return session
