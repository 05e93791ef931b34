"""ModelFiles through the node's loaderd: small files over its API, weights from its shared memory.

Used by the worker's start-up for s3:// models when a loaderd is configured. Deliberately light
(no torch, no boto3 at import): the worker reads config.json and the tokenizer files through it
while torch is still importing, and never creates an S3 client of its own unless the daemon is
down (then it falls back to the S3 path and says so).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from hydraserve.contracts.stage import StageSpec
from hydraserve.errors import NotFoundError
from hydraserve.loaderd.client import LoaderClient

if TYPE_CHECKING:
    from hydraserve.weights.source import TensorSource

# Read ahead at start-up (optional ones answer 404 and read as absent).
STARTUP_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class LoaderModelFiles:
    """The files of one s3:// model as this node's loaderd serves them."""

    def __init__(self, model_uri: str, loader_url: str, token: str, *, endpoint_url: str | None = None,
                 stage: StageSpec | None = None, on_fallback: Callable[[str], None] | None = None) -> None:
        self.model_uri = model_uri
        self._loader_url, self._token = loader_url, token
        self._endpoint_url = endpoint_url
        self._stage = stage
        self._on_fallback = on_fallback
        self._client = LoaderClient(loader_url, token)
        self._pool = ThreadPoolExecutor(max_workers=len(STARTUP_FILES), thread_name_prefix="files")
        self._ahead: dict[str, Future[bytes]] = {
            name: self._pool.submit(self._client.read_file, model_uri, name, endpoint_url)
            for name in STARTUP_FILES}

    def read_text(self, name: str) -> str:
        """The file's text; FileNotFoundError if the model has no such file."""
        future = self._ahead.get(name)
        try:
            data = future.result() if future else self._client.read_file(self.model_uri, name, self._endpoint_url)
        except NotFoundError:
            raise FileNotFoundError(f"{self.model_uri}/{name}") from None
        return data.decode("utf-8")

    def tensor_source(self, names: list[str] | None = None) -> TensorSource:
        """Zero-copy views of the daemon's segments for this worker's stage (S3 if it is down)."""
        from hydraserve.runtime.shm_source import open_shm_source

        self._pool.shutdown(wait=False)
        return open_shm_source(self.model_uri, stage=self._stage, loader_url=self._loader_url, token=self._token,
                               endpoint_url=self._endpoint_url, on_fallback=self._on_fallback)
