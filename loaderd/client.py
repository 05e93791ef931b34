"""The typed client of loaderd's local API, for the placement backends, the runtime and the
demo; also the peer reader one daemon uses to fetch byte ranges from another. Errors come back
as the daemon raised them (hydraserve.http_client); no daemon answering is UnreachableError."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from hydraserve.auth import NodeKeys, mint_peer_token
from hydraserve.contracts.loader import (
    AttachRequest,
    LeaseResponse,
    LoaderStatus,
    ModelIndexResponse,
    PrefetchRequest,
    ReleaseRequest,
    ReleaseResponse,
)
from hydraserve.errors import IntegrityError
from hydraserve.http_client import ServiceClient


class LoaderClient:
    """Calls one loaderd: ``LoaderClient("http://127.0.0.1:7070", token)`` (``token`` a string, or
    a callable asked before each call: a renewed worker token, a peer token minted per read)."""

    def __init__(self, url: str, token: str | Callable[[], str], *, timeout_s: float = 30.0) -> None:
        self._http = ServiceClient("loaderd", url, token, timeout_s=timeout_s)
        self.url = self._http.url

    def healthy(self) -> bool:
        return self._http.healthy()

    def node_name(self) -> str:
        """The node the daemon says it serves (its /healthz: no token asked or sent)."""
        return str(ServiceClient("loaderd", self.url, timeout_s=self._http.timeout_s).request("GET", "/healthz")
                   .json().get("node", ""))

    def prefetch(self, req: PrefetchRequest) -> LeaseResponse:
        """Start fetching a slice; returns its lease (pinned ``req.pin_s`` seconds) at once."""
        body = req.model_dump(mode="json", exclude_none=True)
        return LeaseResponse.model_validate(self._http.request("POST", "/v1/prefetch", json=body).json())

    def attach(self, req: AttachRequest) -> LeaseResponse:
        """Lease a slice for reading (fetching what is missing); release it when done."""
        body = req.model_dump(mode="json", exclude_none=True)
        return LeaseResponse.model_validate(self._http.request("POST", "/v1/attach", json=body).json())

    def renew(self, lease_id: str) -> ReleaseResponse:
        """A heartbeat lease's heartbeat (NotFoundError once it expired)."""
        body = ReleaseRequest(lease_id=lease_id).model_dump(mode="json")
        return ReleaseResponse.model_validate(self._http.request("POST", "/v1/renew", json=body).json())

    def release(self, lease_id: str) -> ReleaseResponse:
        body = ReleaseRequest(lease_id=lease_id).model_dump(mode="json")
        return ReleaseResponse.model_validate(self._http.request("POST", "/v1/release", json=body).json())

    def status(self) -> LoaderStatus:
        return LoaderStatus.model_validate(self._http.request("GET", "/v1/status").json())

    def index(self, model_uri: str, endpoint_url: str | None = None) -> ModelIndexResponse:
        """Every tensor of the model with its byte range, as the daemon resolved it."""
        params = {"model_uri": model_uri, **({"endpoint_url": endpoint_url} if endpoint_url else {})}
        return ModelIndexResponse.model_validate(self._http.request("GET", "/v1/index", params=params).json())

    def read_file(self, model_uri: str, name: str, endpoint_url: str | None = None) -> bytes:
        """A small file of the model (config.json, tokenizer.json) through the daemon's S3 client."""
        params = {"model_uri": model_uri, "name": name, **({"endpoint_url": endpoint_url} if endpoint_url else {})}
        return self._http.request("GET", "/v1/file", params=params).content

    def read_range(self, model_key: str, file: str, start: int, end: int) -> bytes:
        """Bytes a peer holds (NotFoundError if it does not hold them all)."""
        params = {"model_key": model_key, "file": file, "start": start, "end": end}
        return self._http.request("GET", "/v1/range", params=params).content

    def close(self) -> None:
        self._http.close()


class PeerReader:
    """RangeReader over another node's loaderd (tried before S3 when a prefetch names peers;
    never retried: the fetch engine moves on to the next source). Each read carries a peer token
    minted for that holder's node (asked of its /healthz once), good there for ranges only and
    for a minute: the reading daemon's admin token never leaves it."""

    kind = "peer"

    def __init__(self, url: str, keys: NodeKeys, model_key: str, clock: Callable[[], float] = time.time) -> None:
        self.label = url
        self._keys, self._clock = keys, clock
        self._holder = ""
        self._client = LoaderClient(url, self._token, timeout_s=30)
        self._model_key = model_key

    def _token(self) -> str:
        return mint_peer_token(self._keys, self._holder, self._clock()) if self._holder else ""

    def read(self, file: str, start: int, end: int, cancel: threading.Event | None = None) -> bytes:
        if not self._holder:
            self._holder = self._client.node_name()
        return self._client.read_range(self._model_key, file, start, end)

    def read_into(self, file: str, start: int, out: memoryview, cancel: threading.Event | None = None) -> None:
        data = self.read(file, start, start + len(out))
        if len(data) != len(out):
            raise IntegrityError(f"peer {self.label} sent {len(data)} B of {file}[{start}:], expected {len(out)}")
        out[:] = data
