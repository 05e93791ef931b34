"""Push manifest: the files of a pushed model with their sizes and sha256, written LAST.

Format 2 adds, for each safetensors file, the sha256 of its header (bytes [0, data_start)) and
of every tensor's bytes, so a reader can verify each tensor as soon as it lands (loaderd
publishes a tensor only after its hash matched). Format 1 documents (sha256 per file only)
are still accepted.

Written by ``hydraserve model push`` (hydraserve.weights.push) beside the model files as
``hydraserve-manifest.json``; its presence means the upload completed. Read by loaderd and the
runtime to verify fetched bytes (hydraserve.weights.manifest) and by the placement service
for the model's size.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MANIFEST_FILE = "hydraserve-manifest.json"
MANIFEST_FORMAT_VERSION: Literal[2] = 2
_SAFE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$"


class ManifestFile(BaseModel):
    """One file of the model directory."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=_SAFE_NAME, max_length=255)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    # format 2, safetensors files only: sha256 of bytes [0, data_start) and of each tensor
    header_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    tensors: dict[str, Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]] | None = None


class ModelManifest(BaseModel):
    """Every file of a pushed model (except the manifest itself), sorted by name."""

    model_config = ConfigDict(frozen=True)

    format_version: Literal[1, 2] = MANIFEST_FORMAT_VERSION
    files: list[ManifestFile]
    total_bytes: int = Field(ge=0)
    created_at: datetime

    @model_validator(mode="after")
    def _check(self) -> ModelManifest:
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("duplicate file names in manifest")
        if MANIFEST_FILE in names:
            raise ValueError("the manifest cannot list itself")
        if sum(f.size for f in self.files) != self.total_bytes:
            raise ValueError("total_bytes is not the sum of the file sizes")
        for f in self.files:
            if (f.tensors is None) != (f.header_sha256 is None):
                raise ValueError(f"{f.name}: per-tensor hashes need the header's hash and vice versa")
            if f.tensors is not None and self.format_version < 2:
                raise ValueError(f"{f.name}: per-tensor hashes need format_version 2")
        return self

    def file(self, name: str) -> ManifestFile:
        """The entry for ``name``; KeyError if the manifest does not list it."""
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    def names(self) -> list[str]:
        return [f.name for f in self.files]

    def safetensors_bytes(self) -> int:
        """Bytes of weights (what a cold start must fetch for the whole model)."""
        return sum(f.size for f in self.files if f.name.endswith(".safetensors"))


# re-exported for callers that validate names the same way
SAFE_NAME_RE = re.compile(_SAFE_NAME)
