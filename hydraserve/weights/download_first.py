"""A baseline's way to read a model from S3: download every weight file whole, one stream at a
time, to local disk, and load only then (no parallel ranges, no tensor used before its file is
in). This is what serverless vLLM does on a cold start: a vLLM worker with
``load_format="auto"`` (and ``s3_fetch="download"``) downloads into the directory vLLM then
loads (real serverless vLLM).
A directory of its own making is removed when the process exits.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from hydraserve.weights.model_files import INDEX_FILE, S3ModelFiles
from hydraserve.weights.s3_uri import S3Uri

if TYPE_CHECKING:
    from hydraserve.weights.s3 import S3Client


class DownloadFirstModelFiles(S3ModelFiles):
    """An S3 model whose tensors come from a whole-file download to local disk."""

    def __init__(self, uri: S3Uri, client: S3Client) -> None:
        super().__init__(uri, client)
        self._directory: Path | None = None
        self._download_lock = threading.Lock()

    def download(self, into: Path | None = None) -> Path:
        """Every safetensors file (and the index) to a local directory (``into``, else a
        temporary one), one GET after another."""
        with self._download_lock:
            if self._directory is None:
                if into is None:
                    directory = Path(tempfile.mkdtemp(prefix="hydraserve-download-"))
                    atexit.register(shutil.rmtree, directory, True)
                else:
                    directory = into
                    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                files = self.safetensors_files() + ([INDEX_FILE] if self.exists(INDEX_FILE) else [])
                for name in files:
                    data = bytearray(self.objects()[name].size)
                    self.read_into(name, 0, memoryview(data))  # one ranged GET, one stream
                    (directory / name).write_bytes(data)
                self._directory = directory
            return self._directory
