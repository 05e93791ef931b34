"""The daemon's model versions: opened through one S3 client per endpoint, resolved once, then
revalidated cheaply instead of re-listed on every call.

Used by hydraserve.loaderd.service. A cold start calls the daemon about seven times for one
model (prefetch, four small files, the tensor index, attach); the first resolves the version
(listing, headers, manifest, config: two round trips), the rest reuse it. Validating a version
costs one HEAD of the push manifest (a push deletes it first and writes it last, so its ETag
changes with any file), or one LIST for a model pushed without one. Leases (prefetch, attach)
always validate, so a finished re-push is never served from the old version's segments; reads
of small files and the index validate only when the last check is older than ``revalidate_s``
(default 1 s): a cold start costs its resolution plus one HEAD at attach, not a LIST per call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydraserve.weights.retry import RetryPolicy

if TYPE_CHECKING:  # boto3 is imported when a daemon opens its first model, not by `hydraserve --help`
    from hydraserve.weights.model_files import StoredModelFiles
    from hydraserve.weights.model_version import ModelVersion
    from hydraserve.weights.s3 import S3Client

log = logging.getLogger(__name__)

Opener = Callable[[str, str | None], "StoredModelFiles"]  # (model URI, S3 endpoint) -> its files
DEFAULT_REVALIDATE_S = 1.0


class S3Opener:
    """Opens ``s3://`` models (anything else is refused) with one client per endpoint: creating
    one costs ~0.15 s, too much for every cold start. Retries are reported to ``on_retry``."""

    def __init__(self, retry_budget_s: float, on_retry: Callable[[str], None] | None = None) -> None:
        self._retry = RetryPolicy(budget_s=retry_budget_s)
        self._on_retry = on_retry
        self._clients: dict[str | None, S3Client] = {}
        self._lock = threading.Lock()

    def client(self, endpoint_url: str | None) -> S3Client:
        from hydraserve.weights.s3 import S3Client

        with self._lock:
            client = self._clients.get(endpoint_url)
            if client is None:
                client = self._clients[endpoint_url] = S3Client(endpoint_url, retry=self._retry,
                                                                 on_retry=self._on_retry)
            return client

    def __call__(self, uri: str, endpoint_url: str | None) -> StoredModelFiles:
        from hydraserve.weights.model_files import S3ModelFiles
        from hydraserve.weights.s3_uri import parse_s3_uri

        return S3ModelFiles(parse_s3_uri(uri), self.client(endpoint_url))


@dataclass
class HeldModel:
    """An open model and the version resolved from it (``uri`` as the callers name it)."""

    uri: str
    files: StoredModelFiles
    version: ModelVersion
    validated_at: float


class ModelCache:
    """Thread-safe versions by (URI, endpoint) and by version key."""

    def __init__(self, opener: Opener, *, revalidate_s: float = DEFAULT_REVALIDATE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._open = opener
        self.revalidate_s = revalidate_s
        self._clock = clock
        self._held: dict[tuple[str, str | None], HeldModel] = {}
        self._by_key: dict[str, HeldModel] = {}
        self._lock = threading.Lock()

    def get(self, uri: str, endpoint_url: str | None, *, validate: bool = False) -> HeldModel:
        """The model's current version (resolved on first use; re-resolved once it changed).
        ``validate``: check it now, however recently it was checked (leases do)."""
        with self._lock:
            held = self._held.get((uri, endpoint_url))
        now = self._clock()
        if held is not None and (validate or now - held.validated_at >= self.revalidate_s):
            if held.files.fingerprint(fresh=True) == held.version.fingerprint:
                held.validated_at = now
            else:
                log.info("model changed in the store; re-reading its index", extra={"model": uri})
                held = None
        if held is None:
            files = self._open(uri, endpoint_url)
            held = HeldModel(uri, files, files.version(), now)
            with self._lock:
                self._held[(uri, endpoint_url)] = held
                self._by_key[held.version.key] = held
        return held

    def by_key(self, key: str) -> HeldModel | None:
        with self._lock:
            return self._by_key.get(key)

    def forget(self, uri: str) -> None:
        """Drop the version (after an integrity failure: the objects may have changed)."""
        with self._lock:
            for key in [k for k in self._held if k[0] == uri]:
                del self._held[key]
