"""A small typed client of loaderd's local API, for the placement backends, the runtime and
the demo. Also the peer reader one daemon uses to fetch byte ranges from another."""

from __future__ import annotations

from typing import Any

import requests

from hydraserve.contracts.loader import (
    AttachRequest,
    LeaseResponse,
    LoaderStatus,
    PrefetchRequest,
    ReleaseRequest,
    ReleaseResponse,
)
from hydraserve.errors import (
    HydraError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermanentError,
    TemporaryError,
)


class LoaderUnavailableError(TemporaryError):
    """No daemon answered at the URL (down, not started yet, or wrong address)."""


class LoaderApiError(PermanentError):
    """The daemon refused the request with a status we do not map to a narrower type."""


_BY_STATUS: dict[int, type[HydraError]] = {400: InvalidRequestError, 404: NotFoundError,
                                           413: InvalidRequestError, 503: OverloadedError,
                                           502: PermanentError}


class LoaderClient:
    """Calls one loaderd: ``LoaderClient("http://127.0.0.1:7070", token)``."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self.timeout_s = timeout_s
        self._session = requests.Session()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              params: dict[str, Any] | None = None) -> requests.Response:
        try:
            resp = self._session.request(method, self.url + path, json=body, params=params,
                                         headers=self._headers, timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise LoaderUnavailableError(f"loaderd at {self.url} did not answer: {exc}") from exc
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            error_type = _BY_STATUS.get(resp.status_code, LoaderApiError)
            retry = resp.headers.get("Retry-After")
            raise error_type(f"loaderd {path}: {resp.status_code} {message}",
                             retry_after_s=float(retry) if retry else None)
        return resp

    def healthy(self) -> bool:
        try:
            return self._session.get(self.url + "/healthz", timeout=2).ok
        except requests.RequestException:
            return False

    def prefetch(self, req: PrefetchRequest) -> LeaseResponse:
        """Start fetching a slice; returns its lease (pinned ``req.pin_s`` seconds) at once."""
        body = req.model_dump(mode="json", exclude_none=True)
        return LeaseResponse.model_validate(self._call("POST", "/v1/prefetch", body).json())

    def attach(self, req: AttachRequest) -> LeaseResponse:
        """Lease a slice for reading (fetching what is missing); release it when done."""
        body = req.model_dump(mode="json", exclude_none=True)
        return LeaseResponse.model_validate(self._call("POST", "/v1/attach", body).json())

    def release(self, lease_id: str) -> ReleaseResponse:
        body = ReleaseRequest(lease_id=lease_id).model_dump(mode="json")
        return ReleaseResponse.model_validate(self._call("POST", "/v1/release", body).json())

    def status(self) -> LoaderStatus:
        return LoaderStatus.model_validate(self._call("GET", "/v1/status").json())

    def read_file(self, model_uri: str, name: str, endpoint_url: str | None = None) -> bytes:
        """A small file of the model (config.json, tokenizer.json) through the daemon's S3 client."""
        params = {"model_uri": model_uri, "name": name}
        if endpoint_url:
            params["endpoint_url"] = endpoint_url
        return self._call("GET", "/v1/file", params=params).content

    def read_range(self, model_key: str, file: str, start: int, end: int) -> bytes:
        """Bytes a peer holds (404 -> NotFoundError if it does not hold them all)."""
        params = {"model_key": model_key, "file": file, "start": start, "end": end}
        return self._call("GET", "/v1/range", params=params).content

    def close(self) -> None:
        self._session.close()


class PeerReader:
    """RangeReader over another node's loaderd (tried before S3 when a prefetch names peers)."""

    kind = "peer"

    def __init__(self, url: str, token: str, model_key: str) -> None:
        self.label = url
        self._client = LoaderClient(url, token, timeout_s=30)
        self._model_key = model_key

    def read(self, file: str, start: int, end: int) -> bytes:
        return self._client.read_range(self._model_key, file, start, end)
