"""open_model and the tensor sources, local and over real S3 (moto over HTTP): for s3:// models
the tensors come through the one fetch path (the fetch engine into anonymous segments)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hydraserve.contracts.stage import StagePlan, StageSpec
from hydraserve.embedded.s3 import EmbeddedS3
from hydraserve.errors import InvalidRequestError, MissingObjectError, NotFoundError, StorageError
from hydraserve.weights.fetched_source import FetchedTensorSource
from hydraserve.weights.layout import segment_group, stage_tensors
from hydraserve.weights.model_files import HEADER_PROBE_BYTES, S3ModelFiles, StoredModelFiles, open_model
from hydraserve.weights.s3 import RetryPolicy, S3Client
from hydraserve.weights.tensor_sources import tensor_source
from tests.conditions import wait_for

from .checkpoints import llama_tensors, opt_tensors, write_model


def _reference(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("llama"), llama_tensors(layers=6, dtype=torch.bfloat16),
                       config={"model_type": "llama", "num_hidden_layers": 6})


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("sharded"), opt_tensors(layers=5, project=True), shards=3,
                       config={"model_type": "opt", "num_hidden_layers": 5})


def _upload(s3_server: EmbeddedS3, bucket: str, local: Path, prefix: str) -> str:
    return s3_server.upload_dir(local, bucket, prefix)


# ------------------------------------------------------------------ local directories

def test_local_model_files(llama_dir: Path) -> None:
    model = open_model(str(llama_dir))
    assert model.list_files() == ["config.json", "model.safetensors", "tokenizer.json"]
    assert model.config()["num_hidden_layers"] == 6
    assert json.loads(model.read_text("tokenizer.json")) == {"model": {"vocab": {}}}
    reference = _reference(llama_dir)
    index = model.tensor_index()
    assert set(index) == set(reference)
    source = tensor_source(model, ["lm_head.weight", "model.norm.weight"])
    assert source.tensor_names() == ["lm_head.weight", "model.norm.weight"]
    assert torch.equal(source.get("lm_head.weight"), reference["lm_head.weight"])
    with pytest.raises(KeyError):
        source.get("model.embed_tokens.weight")


def test_local_rejects_traversal_and_missing(tmp_path: Path, llama_dir: Path) -> None:
    model = open_model(str(llama_dir))
    for name in ("../etc/passwd", "/etc/passwd", ".."):
        with pytest.raises(InvalidRequestError):
            model.read_bytes(name)
    with pytest.raises(NotFoundError):
        model.read_bytes("generation_config.json")
    with pytest.raises(NotFoundError):
        open_model(str(tmp_path / "nope"))
    with pytest.raises(InvalidRequestError):
        open_model("gs://bucket/model")


def test_index_json_cannot_point_outside_the_model(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path / "m", llama_tensors(layers=1), shards=2)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../../outside.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidRequestError, match="unsafe model file name"):
        open_model(str(model_dir)).tensor_index()


# ------------------------------------------------------------------ S3: index and whole model

def test_s3_tensors_are_byte_exact(s3_server: EmbeddedS3, s3_client: S3Client, bucket: str,
                                   llama_dir: Path) -> None:
    uri = _upload(s3_server, bucket, llama_dir, "org/llama")
    model = open_model(uri, client=s3_client)
    assert model.config()["model_type"] == "llama"
    s3_client.reset_stats()
    index = model.tensor_index()
    # one LIST, the shard index's speculative GET (404 here) and ONE ranged GET for the only header
    assert s3_client.requests == 3
    assert s3_client.bytes_received <= HEADER_PROBE_BYTES

    reference = _reference(llama_dir)
    source = tensor_source(model, list(index), chunk_bytes=4096, concurrency=4)
    try:
        assert set(source.tensor_names()) == set(reference) == set(index)
        for name, tensor in reference.items():
            got = source.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    finally:
        source.close()


def test_long_header_needs_exactly_a_second_get(s3_server: EmbeddedS3, s3_client: S3Client,
                                                bucket: str, tmp_path: Path) -> None:
    tensors = {f"model.layers.{i}.post_attention_layernorm.weight": torch.full((2,), float(i))
               for i in range(1200)}
    write_model(tmp_path / "m", tensors)
    uri = _upload(s3_server, bucket, tmp_path / "m", "long")
    model = open_model(uri, client=s3_client)
    model.list_files()
    s3_client.reset_stats()
    header = model.headers()["model.safetensors"]
    assert header.header_len > HEADER_PROBE_BYTES
    assert s3_client.requests == 2
    got = tensor_source(model, ["model.layers.1199.post_attention_layernorm.weight"])
    assert got.get(got.tensor_names()[0]).tolist() == [1199.0, 1199.0]


def test_sharded_model_with_index(s3_server: EmbeddedS3, s3_client: S3Client, bucket: str,
                                  sharded_dir: Path) -> None:
    uri = _upload(s3_server, bucket, sharded_dir, "opt")
    model = open_model(uri, client=s3_client)
    assert model.safetensors_files() == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    reference = _reference(sharded_dir)
    index = model.tensor_index()
    assert {entry.file for entry in index.values()} == set(model.safetensors_files())
    source = tensor_source(model, list(index), concurrency=3, chunk_bytes=4096)
    for name, tensor in reference.items():
        assert torch.equal(source.get(name), tensor), name
    source.close()


# ------------------------------------------------------------------ S3: stage slices

@pytest.mark.parametrize("boundaries", [[0, 2, 5], [0, 1, 3, 4, 5], [0, 5]])
def test_stage_slices_fetch_only_their_tensors(s3_server: EmbeddedS3, s3_client: S3Client,
                                               bucket: str, sharded_dir: Path,
                                               boundaries: list[int]) -> None:
    uri = _upload(s3_server, bucket, sharded_dir, "opt-stages")
    model = open_model(uri, client=s3_client)
    index = model.tensor_index()
    arch = model.version().architecture  # resolved once, before any counting
    reference = _reference(sharded_dir)
    fetched: set[str] = set()
    for stage in StagePlan.from_boundaries(5, boundaries).stages:
        names = stage_tensors(index, stage, arch)
        s3_client.reset_stats()
        source = tensor_source(model, names, chunk_bytes=64 * 1024)
        assert isinstance(source, FetchedTensorSource)
        source.wait_all(timeout=30)

        assert s3_client.bytes_received == sum(index[n].nbytes for n in names)
        assert s3_client.requests == source.reads and source.bytes_fetched == source.total_bytes
        assert set(source.tensor_names()) == set(names)
        for name in names:
            assert torch.equal(source.get(name), reference[name])
        with pytest.raises(KeyError):
            source.get(next(n for n in index if n not in names) if len(names) < len(index) else "x")
        fetched |= set(names)
    assert fetched == set(index)


class RecordingFiles(S3ModelFiles):
    """The real S3 model, remembering every ranged read (file, start, end) in issue order."""

    def __init__(self, model: StoredModelFiles) -> None:
        assert isinstance(model, S3ModelFiles)
        super().__init__(model.location, model.client)
        self.reads: list[tuple[str, int, int]] = []

    def read_into(self, file: str, start: int, out: memoryview, cancel: object = None) -> None:
        self.reads.append((file, start, start + len(out)))
        super().read_into(file, start, out)


def test_fetch_order_is_layer_order_and_adjacent_tensors_coalesce(
        s3_server: EmbeddedS3, s3_client: S3Client, bucket: str, tmp_path: Path) -> None:
    write_model(tmp_path / "m", llama_tensors(layers=12))  # file order: layers 0, 1, 10, 11, 2, ...
    model = open_model(_upload(s3_server, bucket, tmp_path / "m", "order"), client=s3_client)
    reference = _reference(tmp_path / "m")
    version = model.version()
    names = stage_tensors(version.tensors, StageSpec.whole(12), version.architecture)
    recording = RecordingFiles(model)
    source = FetchedTensorSource(version, recording, names, concurrency=1, hedge_min_s=None)
    source.wait_all(timeout=30)
    group_of_read = []
    for file, start, end in recording.reads:
        inside = [e for e in version.tensors.values() if e.file == file and start <= e.start < end]
        groups = {segment_group(version.architecture.role(e.name)) for e in inside}
        assert len(groups) == 1, "a GET never mixes segment groups"
        group_of_read.append(groups.pop())
    # one stream: the GETs come embeddings, layer 0, 1, ..., 11, then the head, whatever the file order
    assert group_of_read == sorted(group_of_read, key=lambda g: g[0])
    assert [g for g in dict.fromkeys(group_of_read)] == [(0, "embed"), *[(1 + i, f"layer.{i}") for i in range(12)],
                                                         (1_000_000, "head")]
    # a layer's nine tensors are contiguous in the file: one GET fetches them all (the head's two
    # are not: lm_head.weight sorts first in the file, model.norm.weight last)
    assert all(group_of_read.count((1 + i, f"layer.{i}")) == 1 for i in range(12))
    assert group_of_read.count((1_000_000, "head")) == 2 and len(recording.reads) == 15
    assert all(torch.equal(source.get(n), reference[n]) for n in reference)


def test_big_tensor_is_split_into_chunks(s3_server: EmbeddedS3, s3_client: S3Client, bucket: str,
                                         tmp_path: Path) -> None:
    big = torch.arange(300_000, dtype=torch.float32)
    empty = "model.layers.0.input_layernorm.weight"
    write_model(tmp_path / "m", {"model.embed_tokens.weight": big, empty: torch.empty(0)})
    uri = _upload(s3_server, bucket, tmp_path / "m", "big")
    source = tensor_source(open_model(uri, client=s3_client), ["model.embed_tokens.weight", empty],
                                                              chunk_bytes=100_000)
    assert torch.equal(source.get("model.embed_tokens.weight"), big)
    assert source.get(empty).shape == (0,)
    assert isinstance(source, FetchedTensorSource) and source.reads == 12  # 1.2 MB in 100 kB ranges


# ------------------------------------------------------------------ S3: errors

def test_s3_errors_name_the_object(s3_server: EmbeddedS3, s3_client: S3Client, bucket: str,
                                   tmp_path: Path) -> None:
    with pytest.raises(MissingObjectError, match=f"no model files under s3://{bucket}/absent"):
        open_model(f"s3://{bucket}/absent", client=s3_client).safetensors_files()
    with pytest.raises(MissingObjectError, match=f"s3://{bucket}/absent/config.json does not exist"):
        open_model(f"s3://{bucket}/absent", client=s3_client).config()
    with pytest.raises(StorageError, match="bucket 'missing-bucket-y' does not exist"):
        open_model("s3://missing-bucket-y/m", client=s3_client).config()
    for bad in ("s3://models/../x", "s3://models//x", "s3://BAD/x", "s3://models/a\x01"):
        with pytest.raises(InvalidRequestError):
            open_model(bad, client=s3_client)

    model_dir = write_model(tmp_path / "m", llama_tensors(layers=2), shards=2)
    s3_server.upload_dir(model_dir, bucket, "partial")
    s3_client.delete(bucket, "partial/model-00002-of-00002.safetensors")
    with pytest.raises(MissingObjectError, match=f"s3://{bucket}/partial/model-00002-of-00002.safetensors"):
        open_model(f"s3://{bucket}/partial", client=s3_client).tensor_index()


def test_truncated_file_is_rejected_at_index_time(s3_client: S3Client, bucket: str,
                                                  tmp_path: Path) -> None:
    save_file({"model.layers.0.w": torch.ones(1000)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    s3_client.put_bytes(bucket, "trunc/model.safetensors", data[:-10])
    with pytest.raises(InvalidRequestError, match="past the end of the file"):
        open_model(f"s3://{bucket}/trunc", client=s3_client).tensor_index()


def test_traversal_in_s3_index_is_rejected(s3_client: S3Client, bucket: str) -> None:
    s3_client.put_bytes(bucket, "evil/model.safetensors.index.json", json.dumps(
        {"weight_map": {"lm_head.weight": "../other-model/model.safetensors"}}).encode())
    with pytest.raises(InvalidRequestError, match="unsafe model file name"):
        open_model(f"s3://{bucket}/evil", client=s3_client).tensor_index()


# ------------------------------------------------------------------ S3: server dies mid-fetch

@pytest.fixture
def private_server():
    with EmbeddedS3() as server:
        yield server


def test_killed_mid_fetch_and_restarted_completes(private_server: EmbeddedS3, tmp_path: Path) -> None:
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(512, 1024) for i in range(12)}  # 24 MiB
    write_model(tmp_path / "m", tensors)
    uri = private_server.upload_dir(tmp_path / "m", "durable", "m")
    client = private_server.client(retry=RetryPolicy(max_attempts=30, base_delay_s=0.05,
                                                     max_delay_s=0.3, budget_s=30))
    model = open_model(uri, client=client)
    version = model.version()
    client.reset_stats()
    # no hedged duplicates: this test counts every byte received
    source = FetchedTensorSource(version, model, list(tensors), chunk_bytes=512 * 1024, concurrency=2,
                                 hedge_min_s=None)
    deadline = time.monotonic() + 20
    while source.bytes_fetched == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    private_server.kill()
    assert source.finished_at is None, "fetch finished before the kill: test proves nothing"
    assert wait_for(lambda: client.retries >= 1, 10)  # a read met the dead server and is retrying
    private_server.start()
    source.wait_all(timeout=30)
    for name, tensor in tensors.items():
        assert torch.equal(source.get(name), tensor), name
    stats = (f"retries={client.retries} requests={client.requests} reads={source.reads} "
             f"received={client.bytes_received} total={source.total_bytes}")
    assert client.retries >= 1, stats
    assert client.bytes_received == source.total_bytes, stats  # resumed ranges, nothing twice
    source.close()


def test_get_blocks_until_bytes_arrive(private_server: EmbeddedS3, tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    tensors = {name: torch.randn(64, 64)}
    write_model(tmp_path / "m", tensors)
    uri = private_server.upload_dir(tmp_path / "m", "durable", "m")
    client = private_server.client(retry=RetryPolicy(max_attempts=40, base_delay_s=0.05,
                                                     max_delay_s=0.2, budget_s=30))
    model = open_model(uri, client=client)
    model.version()
    private_server.kill()
    source = tensor_source(model, [name])
    assert isinstance(source, FetchedTensorSource)
    with pytest.raises(TimeoutError):
        source.get(name, timeout=0.3)
    assert not source.ready(name)
    private_server.start()
    assert torch.equal(source.get(name, timeout=30), tensors[name])


def test_closed_source_does_not_hang(private_server: EmbeddedS3, tmp_path: Path) -> None:
    name = "model.layers.0.input_layernorm.weight"
    write_model(tmp_path / "m", {name: torch.ones(8)})
    uri = private_server.upload_dir(tmp_path / "m", "durable", "m")
    client = private_server.client()
    model = open_model(uri, client=client)
    model.version()
    client.reset_stats()
    private_server.kill()
    source = tensor_source(model, [name])
    assert wait_for(lambda: client.retries >= 1, 10)  # its GET is now retrying against the dead server (15 s budget)
    started = time.monotonic()
    source.close()
    with pytest.raises(RuntimeError, match="closed before"):
        source.get(name, timeout=5)
    assert isinstance(source, FetchedTensorSource)
    threads = source._engine._threads  # the retrying threads give up at once
    while any(t.is_alive() for t in threads) and time.monotonic() - started < 5:
        time.sleep(0.01)
    assert time.monotonic() - started < 2


def test_fetch_error_surfaces_from_get(s3_server: EmbeddedS3, s3_client: S3Client, bucket: str,
                                      tmp_path: Path) -> None:
    name = "model.layers.0.input_layernorm.weight"
    write_model(tmp_path / "m", {name: torch.ones(10)})
    model = open_model(_upload(s3_server, bucket, tmp_path / "m", "gone"), client=s3_client)
    model.version()
    s3_client.delete(bucket, "gone/model.safetensors")
    source = tensor_source(model, [name])
    with pytest.raises(MissingObjectError, match=f"s3://{bucket}/gone/model.safetensors does not exist"):
        source.get(name, timeout=10)


def test_random_bytes_are_not_a_model(s3_client: S3Client, bucket: str) -> None:
    s3_client.put_bytes(bucket, "junk/model.safetensors", os.urandom(1000))
    with pytest.raises(InvalidRequestError):
        open_model(f"s3://{bucket}/junk", client=s3_client).tensor_index()


# ------------------------------------------------------------------ S3: the download-first baseline

def test_the_download_first_baseline_reads_each_file_with_one_get_then_serves_the_same_tensors(
        s3_server: EmbeddedS3, s3_client: S3Client, bucket: str, sharded_dir: Path) -> None:
    from hydraserve.weights.download_first import DownloadFirstModelFiles
    from hydraserve.weights.s3_uri import parse_s3_uri

    model = DownloadFirstModelFiles(parse_s3_uri(_upload(s3_server, bucket, sharded_dir, "download")), s3_client)
    names = list(model.tensor_index())
    s3_client.reset_stats()
    source = tensor_source(model, names)
    assert s3_client.requests_by_op["GET"] == 3 + 1  # one whole-file GET per shard, and the index
    downloaded = model.download()
    assert sorted(p.name for p in downloaded.iterdir()) == sorted([*model.safetensors_files(),
                                                                   "model.safetensors.index.json"])
    for name, tensor in _reference(sharded_dir).items():
        assert torch.equal(source.get(name), tensor), name
    assert model.download() == downloaded and s3_client.requests_by_op["GET"] == 4  # once per process
