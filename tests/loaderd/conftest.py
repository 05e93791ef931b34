"""Fixtures for loaderd tests: small safetensors models on disk, a local range reader, and
clean-up of any shared-memory segment a test leaves behind (also on failure)."""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hydraserve.contracts.stage import StageSpec
from hydraserve.loaderd.model_index import FileMeta, ModelIndex
from hydraserve.loaderd.segment import TensorSpec

LAYER = re.compile(r"layers\.(\d+)\.")


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


def group_of(name: str) -> tuple[int, str]:
    m = LAYER.search(name)
    if m:
        return 1 + int(m.group(1)), f"layer.{int(m.group(1))}"
    if "embed" in name:
        return 0, "embed"
    return 10_000, "head"


def names_for_stage(names: list[str], stage: StageSpec) -> list[str]:
    out = []
    for n in names:
        m = LAYER.search(n)
        if m:
            if stage.layer_start <= int(m.group(1)) < stage.layer_end:
                out.append(n)
        elif "embed" in n:
            if stage.is_first:
                out.append(n)
        elif stage.is_last:
            out.append(n)
    return out


def local_index(root: Path, *, sha: bool = True, per_tensor: bool = False) -> ModelIndex:
    """Test-only index of a local model (the daemon itself uses hydraserve.weights)."""
    import hashlib

    files: dict[str, FileMeta] = {}
    specs: list[TensorSpec] = []
    headers: dict[str, bytes] = {}
    for path in sorted(root.glob("*.safetensors")):
        raw = path.read_bytes()
        (hlen,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + hlen])
        start = 8 + hlen
        headers[path.name] = raw[:start]
        tensor_sha = {name: hashlib.sha256(raw[start + e["data_offsets"][0]:start + e["data_offsets"][1]]).hexdigest()
                      for name, e in header.items() if name != "__metadata__"} if per_tensor else None
        files[path.name] = FileMeta(path.name, len(raw), start,
                                    hashlib.sha256(raw).hexdigest() if sha else None, None,
                                    hashlib.sha256(raw[:start]).hexdigest() if per_tensor else None, tensor_sha)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            a, b = entry["data_offsets"]
            specs.append(TensorSpec(name, entry["dtype"], tuple(entry["shape"]), path.name, start + a, start + b,
                                    tensor_sha[name] if tensor_sha else None))
    specs.sort(key=lambda s: (s.file, s.start))
    return ModelIndex(uri=f"file://{root}", endpoint_url=None, files=files, tensors=specs,
                      group_of=group_of, names_for_stage=names_for_stage, read_header=headers.__getitem__)


class LocalReader:
    """RangeReader over local files; ``gate`` lets a test hold back reads past an offset."""

    kind = "s3"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = f"local:{root}"
        self.calls = 0
        self.bytes = 0
        self.lock = threading.Lock()
        self.gate: threading.Event | None = None
        self.held: set[tuple[str, int]] = set()  # (file, offset) ranges the gate holds back
        self.fail_next = 0

    def read(self, file: str, start: int, end: int) -> bytes:
        with self.lock:
            self.calls += 1
            self.bytes += end - start
            if self.fail_next:
                self.fail_next -= 1
                raise ConnectionError("injected drop")
        if self.gate is not None and any(f == file and start <= o < end for f, o in self.held):
            self.gate.wait(30)
        with open(self.root / file, "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)


@pytest.fixture
def node_name() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def shm_guard(node_name: str) -> Iterator[str]:
    """Yields the node name; afterwards asserts nothing is left in /dev/shm and removes leftovers."""
    yield node_name
    left = [f for f in os.listdir("/dev/shm") if f.startswith(f"hsld-{node_name}-")]
    for f in left:
        os.unlink(os.path.join("/dev/shm", f))
    assert not left, f"segments left behind: {left}"
