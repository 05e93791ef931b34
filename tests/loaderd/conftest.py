"""Fixtures for loaderd tests: small safetensors models on disk (with the manifest a push
writes), a local directory standing in for S3, and clean-up of any shared-memory segment a
test leaves behind (also on failure)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from hydraserve.contracts.model import MANIFEST_FILE
from hydraserve.weights.manifest import compute_manifest
from hydraserve.weights.model_files import LocalModelFiles


def llama_like(layers: int = 4, hidden: int = 64, vocab: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"model.layers.{i}.self_attn.{part}.weight"] = torch.randn(hidden, hidden, generator=g)
        out[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(hidden, generator=g)
    out["model.norm.weight"] = torch.randn(hidden, generator=g)
    out["lm_head.weight"] = torch.randn(vocab, hidden, generator=g).to(torch.bfloat16)
    return out


def write_model(root: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
        return root
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per:(s + 1) * per]}
        save_file(part, str(root / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root


def write_manifest(root: Path, *, per_tensor: bool) -> None:
    """The push manifest `hydraserve model push` writes (format 2: sha256 per tensor), or its
    format 1 form (sha256 per file only) as older pushes wrote it."""
    manifest = compute_manifest(root)
    if not per_tensor:
        manifest = manifest.model_copy(update={"format_version": 1, "files": [
            f.model_copy(update={"tensors": None, "header_sha256": None}) for f in manifest.files]})
    (root / MANIFEST_FILE).write_text(manifest.model_dump_json())


class LocalStore(LocalModelFiles):
    """A model directory standing in for an S3 prefix (named ``uri``): the daemon resolves,
    checks and reads it with the real code. ``gate`` holds back reads of the (file, offset)
    pairs in ``held``; ``calls`` and ``bytes`` count what was read."""

    kind = "s3"

    def __init__(self, root: Path, uri: str) -> None:
        super().__init__(root)
        self.uri = uri
        self.calls = 0
        self.bytes = 0
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.held: set[tuple[str, int]] = set()

    def read_into(self, file: str, start: int, out: memoryview, cancel: threading.Event | None = None) -> None:
        with self.lock:
            self.calls += 1
            self.bytes += len(out)
        if self.gate is not None and any(f == file and start <= o < start + len(out) for f, o in self.held):
            self.gate.wait(30)
        super().read_into(file, start, out, cancel)


class LocalStores:
    """The daemon's model opener in tests: URI -> a LocalStore of a directory (made once)."""

    def __init__(self, roots: dict[str, Path] | None = None) -> None:
        self.roots = dict(roots or {})
        self.opened: dict[str, LocalStore] = {}

    def __call__(self, uri: str, endpoint_url: str | None) -> LocalStore:
        if uri not in self.opened:
            self.opened[uri] = LocalStore(self.roots[uri], uri)
        return self.opened[uri]
